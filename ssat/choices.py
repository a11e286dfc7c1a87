"""The names that config values choose among, in a module that imports nothing: the schema checks a command line
against them before torch or Lightning is imported (a bad command line fails in under a second), and the
modules that implement the choices take their names from here."""

SCHEDULES = ("cosine", "multistep", "constant", "onecycle")  # optim.schedule: ssat.lightning.classifier
AUTOATTACK_VERSIONS = ("standard", "plus", "rand")  # eval.autoattack.version: ssat.attacks.autoattack
PGD_LOSSES = ("ce", "cw")  # eval.pgd.loss, eval.val_pgd.loss: ssat.attacks.pgd.LOSSES
SAMPLERS = ("ddpm", "ddim")  # generation.sampler.scheduler: ssat.generation.sampling.SAMPLERS
PSEUDO_LABELS = ("hard", "soft")  # ssat.pseudo_labels: ssat.selection.labels
SELECTION_TARGETS = ("pool", "labeled")  # selection.target: ssat.selection.target.TARGETS
EMBED_DTYPES = ("float32", "float16")  # embed.dtype: numpy's dtypes of these names (ssat.artifacts.Embedding)
