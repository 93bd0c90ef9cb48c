"""Which device a setting names: checked here, so that a device this torch or machine lacks is named with the
setting and the fix, instead of failing inside torch at the first tensor."""

from __future__ import annotations

import contextlib

import torch

from ahpa.spelling import did_you_mean


# dense bf16 (and fp16) tensor-core peak, TFLOP/s, by the name torch reports: the MFU denominator of training logs and
# benchmarks. A GPU not listed gets no MFU figure rather than a guessed one.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))


def peak_tflops(device: torch.device) -> float | None:
    """The dense 16-bit tensor-core peak of a CUDA device (TFLOP/s), or None: another device, or a GPU not listed."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in PEAK_BF16_TFLOPS if key in name), None)


def resolve_device(spec: str, setting: str = "train.device") -> torch.device:
    """auto (CUDA, else MPS, else CPU) or the device named; one this torch or machine lacks is refused here, naming
    `setting` (the config key or the command's flag), instead of failing inside torch at the first tensor."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        near = " (did you mean 'cuda'?)" if str(spec).lower().startswith("gpu") else did_you_mean(
            spec, ("auto", "cpu", "cuda", "mps"))  # 'gpu' is spelled like 'cpu' and means the other
        raise ValueError(f"{setting}={spec!r} is not a device{near}; valid: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        built = torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None  # ROCm answers to cuda
        why = "sees no CUDA GPU" if built else "was built without CUDA (a CPU build)"
        raise ValueError(f"{setting}={spec!r}: this torch ({torch.__version__}) {why}; use {setting}=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{setting}={spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0.."
                         f"cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not mps:
        raise ValueError(f"{setting}={spec!r}: MPS is not available here; use {setting}=auto or cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{setting}={spec!r}: ahpa runs on auto, cpu, cuda, cuda:N or mps")
    return device


def as_device(device: "str | torch.device", setting: str = "device") -> torch.device:
    """What the Python API takes: a torch.device or its name ("cpu", "cuda:1", "auto"), checked as resolve_device
    checks a setting."""
    return resolve_device(str(device), setting)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A region run in `dtype` under autocast on `device`, or, with None, as written, whatever autocast the caller is
    in. Disabling is autocast's own on CUDA and the CPU, the devices ahpa autocasts on by default; elsewhere nothing is
    built: torch < 2.5 cannot construct even a disabled autocast for MPS (it asks MPS for a default dtype it lacks)."""
    if dtype is None and device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def float64_device(device: "str | torch.device") -> torch.device:
    """Where float64 sums for `device` live: there, except on MPS, which has no float64 (the CPU then)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device
