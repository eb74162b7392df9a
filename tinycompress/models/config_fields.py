"""Fields tinycompress adds to a Hugging Face model config (and so to its ``config.json``).

Kept apart from :mod:`tinycompress.models.structure` so that code which only reads a folder's
``config.json`` (the checkpoint format, the report) can name them without importing torch.
"""

# The pruned structure (original ids of the kept heads, FFN width per layer): the shapes
# ``config.json`` alone cannot express, rebuilt by ``apply_structure_`` before weights load.
STRUCTURE_ATTR = "tinycompress_pruning"
# Inside that record, once a layer has been removed: the unpruned model's layer count (the saved
# config's own count is then the reduced one, and "heads kept / total" needs the original).
LAYERS_TOTAL_KEY = "layers_total"
# The classification head when it is not Hugging Face's own [CLS] one ("mean": mean pooling;
# see :mod:`tinycompress.models.heads`); absent for a [CLS] head.
HEAD_ATTR = "tinycompress_head"
