"""What each operator costs by convention: the classification both FLOP counters share.

A *contraction* (convolution, linear, matrix product, einsum, attention) is counted in
multiply-accumulates (MACs); fvcore reports MACs and torch.utils.flop_counter 2 FLOPs per MAC. Every
other operator is put in a named class that costs no MACs by convention (element-wise, normalization,
reduction, pooling, resampling, data movement, random). An operator in none of these classes is
*unknown*: a counter that meets one cannot vouch for its total, so the model is flagged rather than
silently undercounted (an FFT, a linear solve, a custom op, an opaque Python autograd function).
"""
from __future__ import annotations

import functools

import torch

# counted by both counters (fvcore handles in counters.py; flop_counter's registry)
CONTRACTIONS = frozenset({
    "convolution", "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "cudnn_convolution", "cudnn_convolution_transpose", "mkldnn_convolution",
    "_slow_conv2d_forward", "slow_conv3d_forward", "slow_conv_transpose2d", "slow_conv_transpose3d",
    "convolution_overrideable", "linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum",
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward",
    "_scaled_mm",
})

NORMALIZATION = frozenset({
    "batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional", "_batch_norm_impl_index", "_batch_norm_with_update",
    "_batch_norm_no_update", "cudnn_batch_norm", "miopen_batch_norm", "instance_norm", "group_norm",
    "native_group_norm", "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm",
    "local_response_norm",
})

REDUCTION = frozenset({
    "sum", "mean", "var", "std", "var_mean", "std_mean", "amax", "amin", "max", "min", "aminmax", "argmax",
    "argmin", "prod", "norm", "linalg_vector_norm", "frobenius_norm", "logsumexp", "cumsum", "cumprod",
    "any", "all", "count_nonzero", "softmax", "_softmax", "log_softmax", "_log_softmax", "topk", "sort",
    "argsort", "median", "nansum", "nanmean", "kthvalue", "mode",
})

POOLING = frozenset({
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "max_unpool2d", "max_unpool3d", "mkldnn_max_pool2d",
    "mkldnn_max_pool3d", "mkldnn_adaptive_avg_pool2d",
})

RESAMPLING = frozenset({
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
    "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
    "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa",
    "grid_sampler", "grid_sampler_2d", "grid_sampler_3d", "affine_grid_generator", "pixel_shuffle",
    "pixel_unshuffle",
})

DATA = frozenset({
    "cat", "concat", "stack", "hstack", "vstack", "clone", "copy", "copy_", "_to_copy", "to", "contiguous",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like", "ones",
    "ones_like", "full", "full_like", "new_zeros", "new_ones", "new_full", "fill", "fill_", "zero_", "zero",
    "arange", "linspace", "logspace", "eye", "scalar_tensor", "tensor", "constant_pad_nd", "pad",
    "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d",
    "replication_pad3d", "circular_pad1d", "circular_pad2d", "circular_pad3d", "_pad_circular",
    "index", "_index_put_impl", "index_put", "index_select", "index_add", "index_copy", "index_fill",
    "gather", "scatter", "scatter_add", "scatter_reduce", "slice_scatter", "select_scatter",
    "diagonal_scatter", "as_strided_scatter", "masked_select", "masked_scatter", "take", "put",
    "roll", "flip", "repeat", "repeat_interleave", "tile", "expand", "expand_as", "expand_copy", "permute",
    "permute_copy", "transpose", "transpose_copy", "t", "view", "view_copy", "reshape", "_reshape_alias",
    "_unsafe_view", "flatten", "unflatten", "squeeze", "squeeze_copy", "unsqueeze", "unsqueeze_copy",
    "select", "select_copy", "slice", "slice_copy", "split", "split_with_sizes", "split_copy",
    "split_with_sizes_copy", "unsafe_split", "chunk", "unsafe_chunk", "unbind", "unbind_copy", "narrow",
    "detach", "detach_", "alias", "lift_fresh", "lift_fresh_copy", "as_strided", "as_strided_copy",
    "movedim", "moveaxis", "swapaxes", "unfold", "im2col", "col2im", "channel_shuffle", "resize_",
    "size", "sym_size", "stride", "numel", "dim", "is_same_size", "Int", "ScalarImplicit", "Float",
    "Bool", "_local_scalar_dense", "item", "type_as", "view_as", "reshape_as", "embedding",
    "embedding_dense_backward", "one_hot", "nonzero", "unique", "_unique2", "unique_dim", "bucketize",
    "searchsorted", "tril", "triu", "diagonal", "diag", "diag_embed", "block_diag", "broadcast_to",
    "broadcast_tensors", "meshgrid", "atleast_1d", "atleast_2d", "atleast_3d", "set_", "_assert_async",
    "_assert_scalar", "_functional_assert_async", "sym_constrain_range_for_size", "__and__", "__or__",
    "floor_divide", "remainder", "masked_fill", "masked_fill_", "_has_compatible_shallow_copy_type",
    "_copy_from", "_copy_from_and_resize", "pin_memory", "_pin_memory", "record_stream",
    "_unsafe_index", "_unsafe_index_put", "_unsafe_masked_index", "_unsafe_masked_index_put_accumulate",
})

# point-wise operators PyTorch does not tag as such (a learned slope is still one op per element)
ELEMENTWISE_EXTRA = frozenset({"prelu", "_prelu_kernel", "rrelu", "rrelu_with_noise", "glu", "hardswish",
                               "hardsigmoid", "mish", "softplus", "celu", "selu", "logit"})

RANDOM = frozenset({
    "dropout", "dropout_", "native_dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
    "bernoulli", "bernoulli_", "rand", "randn", "rand_like", "randn_like", "randint", "randint_like",
    "randperm", "normal", "normal_", "uniform", "uniform_", "multinomial", "exponential_", "random_",
})

# dispatcher metadata queries (no computation)
PRIM_METADATA = frozenset({"prim::device", "prim::layout", "prim::dtype"})

NO_MAC_CLASSES = {
    "normalization": NORMALIZATION, "reduction": REDUCTION, "pooling": POOLING,
    "resampling": RESAMPLING, "data": DATA, "random": RANDOM,
}


@functools.lru_cache(maxsize=1)
def pointwise_ops() -> frozenset[str]:
    """Names of the aten operators PyTorch tags as point-wise (``torch.Tag.pointwise``)."""
    names = set()
    for full in torch._C._dispatch_get_all_op_names():
        if not full.startswith("aten::"):
            continue
        base, _, overload = full[len("aten::"):].partition(".")
        packet = getattr(torch.ops.aten, base, None)
        if packet is None:
            continue
        try:
            op = getattr(packet, overload or "default")
        except (AttributeError, RuntimeError):
            continue
        if torch.Tag.pointwise in op.tags:
            names.add(base)
    return frozenset(names)


def op_base_name(name: str) -> str:
    """``aten::add_`` / ``aten.add.Tensor`` / ``add`` -> ``add`` (namespace, overload and in-place ``_`` dropped)."""
    if "::" in name:
        namespace, name = name.split("::", 1)
        if namespace != "aten":
            return f"{namespace}::{name}"
    elif name.startswith("aten."):
        name = name[len("aten."):]
    name = name.split(".")[0]
    if name.endswith("_") and not name.startswith("_") and name not in DATA:
        name = name[:-1]
    return name


def classify(name: str) -> str:
    """The cost class of an operator, given as fvcore's ``aten::xxx`` kind or a dispatcher name.

    Returns ``"contraction"``, ``"elementwise"``, one of :data:`NO_MAC_CLASSES`, or ``"unknown"``
    (anything outside the aten namespace, e.g. ``prim::PythonOp.<Function>`` or a custom op).
    """
    base = op_base_name(name)
    if base in PRIM_METADATA:
        return "data"
    if "::" in base:
        return "unknown"
    if base in CONTRACTIONS:
        return "contraction"
    for cls, names in NO_MAC_CLASSES.items():
        if base in names or name.split("::")[-1].split(".")[0] in names:
            return cls
    if base in ELEMENTWISE_EXTRA or base in pointwise_ops():
        return "elementwise"
    return "unknown"
