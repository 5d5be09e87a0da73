"""The demo and its scaffolding: a synthetic shapes corpus, a local web server, a tiny VQ trainer, the run, its page."""
