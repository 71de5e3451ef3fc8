"""``check_device``: a device string checked against this machine, with a one-line error.

Training, evaluation and the tools take ``--device``; all of them check it here, before any
data or model is loaded.
"""

import torch


def check_device(device):
    """``device`` as a ``torch.device``, after checking that this machine has it.

    Raises ``ValueError`` with one line for an unknown device string, CUDA without a GPU, a
    GPU index this machine does not have, or a device that holds no data (``meta``).
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r} ({str(exc).splitlines()[0][:150]}); use "
                         f"'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: no CUDA GPU is available on this machine "
                             f"(torch.cuda.is_available() is False); use device 'cpu'")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA GPU(s), "
                             f"cuda:0 to cuda:{count - 1}")
    elif resolved.type == "meta":
        # Tensors there have shapes but no values: nothing could be trained or saved.
        raise ValueError(f"device {device!r} holds no data, so a model cannot train on it; use "
                         f"'cpu' or 'cuda'")
    elif resolved.type != "cpu":
        try:
            torch.empty(1, device=resolved)
        except Exception as exc:  # torch raises several types for a missing backend
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:150]
            raise ValueError(f"device {device!r} is not usable on this machine ({reason})") from None
    return resolved
