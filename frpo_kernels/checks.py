"""Argument checks for the public API: every bad input becomes a ValueError/TypeError that names
the argument, before any kernel touches memory."""
from __future__ import annotations

import math
import numbers

import torch

from frpo_kernels.groups import SCALE_REWARDS, scale_rewards_mode


def _checking_values() -> bool:
    """Value checks read tensor data (a device sync, and a graph break under torch.compile);
    a compiled graph skips them so that fullgraph=True works."""
    return not torch.compiler.is_compiling()


def check_logits_and_ids(logits, ids, ids_name="completion_ids"):
    """Types, shapes and devices; the ids' range is check_ids_in_range's, once the mask is checked."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {_describe(logits)}")
    if logits.device.type == "meta":
        raise ValueError("logits is a meta tensor (shape only, no data): the loss reads values; "
                         "pass real tensors")
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, T, V], got {tuple(logits.shape)}")
    for name, size in zip("BTV", logits.shape):
        if size == 0:
            raise ValueError(f"logits has {name} = 0 (shape {tuple(logits.shape)}); nothing to compute")
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool \
            or ids.is_complex():
        raise TypeError(f"{ids_name} must be an integer tensor, got {_describe(ids)}")
    if tuple(ids.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"{ids_name} must have shape {tuple(logits.shape[:2])} (logits' [B, T]), "
                         f"got {tuple(ids.shape)}")
    if ids.device != logits.device:
        raise ValueError(f"{ids_name} is on {ids.device} but logits are on {logits.device}")


def check_ids_in_range(name, ids, vocab, mask, vocab_is="logits.shape[-1]"):
    """ids in [0, vocab) wherever they are read: where mask != 0, or everywhere without a mask. Masked
    positions are never read by any backend, so padding there (HF's ignore index -100) is fine."""
    if not _checking_values():
        return
    read = ids if mask is None else ids[mask != 0]
    if read.numel() and bool(((read < 0) | (read >= vocab)).any()):
        where = "" if mask is None else " where the mask is not 0"
        raise ValueError(f"{name} has entries outside [0, {vocab}) (V = {vocab_is}){where}: "
                         f"min {int(read.min())}, max {int(read.max())}")


def check_overwritable(name, overwrite, logits):
    if not isinstance(overwrite, bool):
        raise TypeError(f"{name} must be True or False, got {_describe(overwrite)}")
    if overwrite and torch._debug_has_internal_overlap(logits) != 0:
        raise ValueError(f"{name}=True needs logits whose elements have storage of their own, got strides "
                         f"{logits.stride()} (expanded or overlapping); pass {name}=False")


def check_temperature(temperature):
    check_number("temperature", temperature, lambda x: x > 0, "a finite number > 0")


def check_token_tensor(name, value, shape, device, allow_none=True, floating=False):
    """floating: the values are real numbers such as log-probabilities (an integer tensor is a mistake)."""
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} is required")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape {shape}, got {_describe(value)}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but logits are on {device}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (log-probabilities), got {value.dtype}")


def check_finite_per_sequence(name, value, batch, device):
    """Per-sequence values (rewards, advantages): any integer or floating-point dtype, all finite."""
    check_token_tensor(name, value, (batch,), device, allow_none=False)
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must be a tensor of real numbers (an integer or floating-point dtype), "
                        f"got {value.dtype}")
    if _checking_values() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_token_weights(name, mask):
    """A mask's entries weight their tokens: each must be finite and >= 0 (0 leaves the token out). A
    negative or NaN entry would otherwise make a row look empty or turn the loss NaN."""
    if mask is None or mask.dtype == torch.bool or not _checking_values():
        return
    if mask.is_complex():
        raise TypeError(f"{name} must be a real tensor, got {mask.dtype}")
    bad = ~(torch.isfinite(mask) & (mask >= 0))
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} must hold finite weights >= 0 (1 = completion token, 0 = left out), got "
                         f"{float(mask[first])!r} at {list(first)} ({int(bad.sum())} such entries)")


def check_groups(batch, group_size, group_ids, device, jackknife, needs_pairs_reason=None):
    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size (contiguous groups) and group_ids ([B] ids)")
    if group_size is not None:
        check_positive_int("group_size", group_size)
        if batch % group_size:
            raise ValueError(f"group_size={group_size} does not divide the batch size B={batch}")
        if jackknife and group_size == 1:
            raise ValueError("group_size=1 with jackknife=True: the leave-one-out mean needs >= 2 "
                             "members per group (use jackknife=False or larger groups)")
        return
    check_group_ids(group_ids, batch, device)
    if jackknife and _checking_values():
        _, counts = torch.unique(group_ids, return_counts=True)
        if bool((counts < 2).any()):
            raise ValueError("group_ids has a group of size 1 with jackknife=True: the leave-one-out "
                             "mean needs >= 2 members per group (use jackknife=False)")


def check_group_ids(group_ids, batch, device):
    """[B] integer ids: a float dtype would round large ids together (float32: 16777217 -> 16777216)."""
    check_token_tensor("group_ids", group_ids, (batch,), device, allow_none=False)
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool or group_ids.is_complex():
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")


def check_scale_rewards_name(scale_rewards):
    if not any(scale_rewards is mode or (isinstance(scale_rewards, str) and scale_rewards == mode)
               for mode in SCALE_REWARDS):
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")


def check_scale_rewards(scale_rewards, group_counts):
    """Enough rewards for the std that scale_rewards divides by (its name is checked by LossConfig)."""
    if scale_rewards_mode(scale_rewards) == "group" and _checking_values() \
            and bool((group_counts < 2).any()):
        raise ValueError(f"scale_rewards={scale_rewards!r} needs >= 2 members per group (std of one reward)")
    if scale_rewards == "batch" and _checking_values() and int(group_counts.sum()) < 2:
        raise ValueError("scale_rewards='batch' needs >= 2 rewards in the batch (std of one reward)")


def check_number(name, value, ok, what):
    """A real number (Python, NumPy or a one-element tensor's .item()) that is finite and ok()."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {float(value)!r}")


def item_number(name, value):
    """A one-element tensor (TRL's num_items_in_batch is one) as its Python number; anything else as is."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number or a one-element tensor, got {_describe(value)}")
        return value.item()
    return value


def check_importance_sampling_ratio(ratio, batch, length, device, mask, per_token_only, loss_type):
    """[B, T] or [B, 1] real, finite and >= 0 where read (where mask != 0; a [B, 1] ratio: every row).
    per_token_only: the loss type reads the ratio per token (vespo's gamma weights), as TRL requires."""
    if ratio is None:
        return
    if not isinstance(ratio, torch.Tensor) or not ratio.is_floating_point():
        raise TypeError(f"importance_sampling_ratio must be a floating-point tensor of shape [B, T] or [B, 1], "
                        f"got {_describe(ratio)}")
    if tuple(ratio.shape) not in ((batch, length), (batch, 1)):
        raise ValueError(f"importance_sampling_ratio must have shape {(batch, length)} or {(batch, 1)}, "
                         f"got {tuple(ratio.shape)}")
    if ratio.device != device:
        raise ValueError(f"importance_sampling_ratio is on {ratio.device} but logits are on {device}")
    if per_token_only and ratio.shape[1] != length:
        raise ValueError(f"loss_type={loss_type!r} reads importance_sampling_ratio per token inside its gamma "
                         f"weights: pass it as [B, T] (TRL's vllm_importance_sampling_mode 'token_truncate' or "
                         f"'token_mask'), got shape {tuple(ratio.shape)}")
    if not _checking_values():
        return
    read = ratio if mask is None or ratio.shape[1] != length else ratio[mask != 0]
    bad = ~(torch.isfinite(read) & (read >= 0))
    if bool(bad.any()):
        raise ValueError(f"importance_sampling_ratio must be finite and >= 0 where the mask is not 0, "
                         f"got {int(bad.sum())} entries that are not (e.g. {float(read[bad][0])!r})")


def check_positive_int(name, value):
    """An integer >= 1 (Python or NumPy; a bool is not one), returned as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def optional_positive_int(name, value):
    """None, or check_positive_int's Python int."""
    return None if value is None else check_positive_int(name, value)


def _describe(value, with_device=False):
    if isinstance(value, torch.Tensor):
        where = f" on {value.device}" if with_device else ""
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}{where}"
    return f"{type(value).__name__} {value!r}"


def check_linear_inputs(hidden, weight, bias, ids, mask, ids_name="ids"):
    """ValueError/TypeError naming the bad argument, before any GEMM runs: types, shapes and devices
    (the ids' range is checks.check_ids_in_range's, once the mask is checked)."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {_describe(hidden, True)}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must have shape [B, T, H] or [N, H], got {tuple(hidden.shape)}")
    if any(s == 0 for s in hidden.shape):
        raise ValueError(f"hidden has a zero-size dimension (shape {tuple(hidden.shape)}); nothing to compute")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor [V, H], got {_describe(weight, True)}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [V, H] with V > 0, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has H = {weight.shape[1]} (shape {tuple(weight.shape)}) but hidden has "
                         f"H = {hidden.shape[-1]} (shape {tuple(hidden.shape)})")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight is {weight.dtype} but hidden is {hidden.dtype}; pass both in one dtype")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    vocab = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be None or a floating-point tensor [V], got {_describe(bias, True)}")
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must have shape [V] = ({vocab},) (weight's rows), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias is {bias.dtype} but hidden is {hidden.dtype}; pass both in one dtype")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    lead = tuple(hidden.shape[:-1])
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool \
            or ids.is_complex():
        raise TypeError(f"{ids_name} must be an integer tensor, got {_describe(ids, True)}")
    if tuple(ids.shape) != lead:
        raise ValueError(f"{ids_name} must have shape {lead} (hidden's leading dimensions), got {tuple(ids.shape)}")
    if ids.device != hidden.device:
        raise ValueError(f"{ids_name} is on {ids.device} but hidden is on {hidden.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be None or a tensor of shape {lead}, got {_describe(mask, True)}")
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask must have shape {lead} (hidden's leading dimensions), got {tuple(mask.shape)}")
        if mask.device != hidden.device:
            raise ValueError(f"mask is on {mask.device} but hidden is on {hidden.device}")


def check_ratio_and_sampling_logps(cfg, importance_sampling_ratio, sampling_logps, batch, length, device,
                                   completion_mask):
    """The per-token tensors of TRL's options, as loss() and group_stats() both take them."""
    check_importance_sampling_ratio(importance_sampling_ratio, batch, length, device, completion_mask,
                                    cfg.kind.ratio_inside, cfg.loss_type)
    check_token_tensor("sampling_logps", sampling_logps, (batch, length), device)
    if sampling_logps is not None and cfg.off_policy_mask_threshold is None:
        raise ValueError("sampling_logps is read only by the off-policy mask: pass off_policy_mask_threshold "
                         "with it")
