"""The streaming pretraining data, link by link (each module with its own tests):

  1. `train.sources`: each mixture source's catalogs -> its shards, checked against the model (fold, codebook,
     tokenizer vocab hash); a source's identity is its content (shard sha256s), not where it is stored.
  2. `train.source_order`: a source's sample order in an epoch, a whole-source shuffle that is a pure function
     of (seed, source, epoch); any position maps to its sample in O(1), so resuming never replays.
  3. `train.shard_store`: per source, the index rows of every sample (from the shards' sidecars, each checked
     against its catalog row, else rebuilt from the tar), cached once per machine; single samples read by byte
     range (pread locally, range GETs on S3), each checked against its xxh3 before decoding.
  4. `train.plan`: the global batch of every step, identical on every rank and worker, from the tables alone
     (weighted fair queueing over the sources, in samples or tokens), and the token-balanced rank split.
  5. `train.dataset`: the loader config, the torch dataset and loader: each worker builds only its rank's
     samples of its own steps, `train.sequence` lays them out and `train.packing` packs them per task.

State is a handful of counters per source (epoch, position) plus the step, the order, the seed and the
agreed skip list, the same on every rank: resuming on another number of ranks or workers continues the same
global stream, so the epoch's remaining samples are neither repeated nor skipped. Changing the mixture keeps
each source's position, so no source repeats a sample within its epoch.

Bytes read per machine per epoch: the sources' indices once, then only its ranks' own samples.
"""

from train.dataset import LoaderConfig, StepBatch, StreamingLoader, StreamingMixture
from train.sources import ModelDataSpec

__all__ = ["LoaderConfig", "ModelDataSpec", "StepBatch", "StreamingLoader", "StreamingMixture"]
