"""Fused Triton kernels for the looped block, each with a PyTorch reference (megaloop.kernels).

Every public op takes ``backend=``: a :class:`KernelBackend` (or its name) that the caller passes
in, the model the one its config's ``kernels:`` entry names (see ``dispatch``). ``auto`` (the
default) runs Triton on CUDA tensors when triton is importable and the reference otherwise;
``triton`` forces the kernels (on CPU under TRITON_INTERPRET=1); ``torch`` the reference. The
Triton code lives in ``megaloop.kernels.triton``, imported only when a kernel runs: importing this
package never imports triton, and triton is optional.
"""
from .dispatch import BACKENDS, KernelBackend, triton_available
from .qk_norm_rope import qk_norm_rope, qk_norm_rope_reference
from .recurrence import (
    hc_combine,
    hc_combine_reference,
    hc_update,
    hc_update_reference,
    inject,
    inject_e_half,
    inject_reference,
    recur_norm_inject,
    recur_norm_inject_reference,
)
from .relu_squared import relu_squared, relu_squared_reference
from .rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from .softcap_ce import softcap_cross_entropy, softcap_cross_entropy_reference

__all__ = [
    "BACKENDS", "KernelBackend", "triton_available",
    "rms_norm", "add_rms_norm", "qk_norm_rope", "relu_squared",
    "recur_norm_inject", "inject", "inject_e_half", "hc_combine", "hc_update", "softcap_cross_entropy",
    "rms_norm_reference", "add_rms_norm_reference", "qk_norm_rope_reference", "relu_squared_reference",
    "recur_norm_inject_reference", "inject_reference", "hc_combine_reference", "hc_update_reference",
    "softcap_cross_entropy_reference",
]
