"""``load_model``: a model from any model file, this project's checkpoint or export, or a
state dict of the original implementation (unixpickle/vq-draw), converted on reading.

This is the one place that decides whether a file is the original's: it sits above both
vq_draw/checkpoint.py (this project's format) and vq_draw/convert.py (the original's).
"""

from .checkpoint import load_file, model_from_checkpoint, validate_checkpoint


def read_model_file(path, map_location="cpu", dataset=None):
    """A validated checkpoint dict from ``path``: this project's file as it is, or the original's
    state dict converted (``dataset`` names its dataset where the shapes do not). Raises
    ``CheckpointError`` with one line for anything else."""
    # Imported here, not with the package: ``python -m vq_draw.convert`` would find it loaded.
    from .convert import convert_state_dict, is_original_state_dict
    obj = load_file(path, map_location)
    if is_original_state_dict(obj):
        return convert_state_dict(obj, dataset, path)
    return validate_checkpoint(obj, path)


def load_model(path, map_location="cpu", dataset=None):
    """Rebuild a model from a model file alone; returned in eval mode on ``map_location``.

    Also reads the original implementation's state dicts (``dataset`` where the shapes leave
    it open, as ``read_model_file``).
    """
    model = model_from_checkpoint(read_model_file(path, map_location, dataset), path)
    return model.to(map_location).eval()
