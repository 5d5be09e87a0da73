"""The special tokens and the pretraining prompts, defined once (DESIGN.md "Model facts").

Sequence layout (built by `train.sequence` at load time, never baked into shards):
  understanding: <s> [<tile>? <boi> IMG*n <eoi>]* per tile, [<thumbnail> <boi> IMG*n <eoi>] PROMPT_UND caption </s>
  generation:    <s> PROMPT_GEN caption <boi> IMG*n <eoi> </s>     (10%: PROMPT_UNCOND instead of prompt+caption)
`IMG` positions carry the placeholder id `<img>` in `input_ids`; their embeddings come from the fold MLP.
"""

BOS = "<s>"
EOS = "</s>"
PAD = "<pad>"
BOI = "<boi>"  # begin of image
EOI = "<eoi>"  # end of image
IMG = "<img>"  # placeholder id at every folded image position
UNCOND = "<UNCOND>"  # learned token of the classifier-free-guidance prompt
TILE = "<tile>"  # precedes each dynamic-resolution tile (understanding)
THUMBNAIL = "<thumbnail>"  # precedes the whole-image thumbnail when there is more than one tile

# Tokens the model adds to any text tokenizer (the LLM's own BOS/EOS/PAD are used when it has them).
MODEL_SPECIAL_TOKENS = [BOI, EOI, IMG, UNCOND, TILE, THUMBNAIL]
ALL_SPECIAL_TOKENS = [BOS, EOS, PAD, *MODEL_SPECIAL_TOKENS]

# Pretraining prompts (SynerGen-VL §3.2 and §4.1).
PROMPT_UND = "Provide a one-sentence caption for the image:"
PROMPT_GEN = "Generate an image of:"
PROMPT_UNCOND = f"Here is a random image {UNCOND}:"
UNCOND_PROB = 0.10  # share of generation prompts replaced by PROMPT_UNCOND in training
