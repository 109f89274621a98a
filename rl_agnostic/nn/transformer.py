r"""Post-norm Transformer encoder layer with fused attention.

Computes exactly ``nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward, dropout,
activation="gelu", batch_first=True)`` (the paper's layer):

    a = softmax(Q Kᵀ / sqrt(d_head)) V,   Q,K,V = x W_in + b_in
    x ← LayerNorm(x + Dropout(a W_out + b_out))
    x ← LayerNorm(x + Dropout(W_2 Dropout(GELU(W_1 x + b_1)) + b_2))

but with one fused QKV projection and ``scaled_dot_product_attention`` (flash kernel on CPU and
GPU: memory O(B·L·H) instead of O(B·L²), no softmax matrix kept for backward when attention
dropout is off), and none of the generic module's argument checking per call. Training on CPU
(float32, one head, L ≤ NATIVE_ATTENTION_MAX_LEN: observation and action sequences) computes the
attention, its dropout and backward in one compiled kernel on the packed QKV projection, and each
residual LayerNorm(x + Dropout(·)) in another (`rl_agnostic.nn.native`); with the kernels the
Linear layers run as plain products, their biases added (and their gradients summed) by the
kernel that reads their output. With one head, the whole training layer is then one autograd
node (`_NativeTransformerLayer`) whose backward sums each residual's two gradients inside a
product (``addmm_``). Acting (eval mode, no autograd) runs the whole layer as torch's
one native fused op, the one ``nn.TransformerEncoderLayer`` uses for its inference fast path.
``to_reference`` builds the plain torch layer with the same weights (used by the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl_agnostic.nn.dropout import (
    _add_dropout_layernorm,
    _add_dropout_layernorm_backward,
    _bias_gelu_dropout,
    _bias_gelu_dropout_backward,
    add_dropout_layernorm,
    draw_seed,
    fuses_bias,
    gelu_dropout,
    linear_leaving_bias,
    mask_args,
    needs_graph,
    softmax_dropout,
    softmax_dropout_backward,
    softmax_dropout_forward,
    trains_in_one_node,
    use_native,
)
from rl_agnostic.nn.native import kernels

_FUSED_INFERENCE = hasattr(torch, "_transformer_encoder_layer_fwd")
# Up to this length (single head, CPU float32, training) attention is one compiled kernel on the
# packed QKV projection (`rla_attention`). Forward + backward at B=512, dropout 0.1, against torch's
# split/bmm/softmax/dropout path: 0.38x the time at L=4, 0.76x at L=17 (H=256: 0.68x), 0.67x at
# L=24, 0.93x at L=32 (H=256: 1.2x). No (B, L, L) dropout mask is stored.
NATIVE_ATTENTION_MAX_LEN = 24
_ATTENTION_KERNEL_MAX_LEN = 64  # cpu_kernels.c ATTN_MAX_LEN: the kernel's stack buffers


def _scratch(xw: Tensor, bias: Tensor | None) -> tuple[Tensor | None, int]:
    """Per-thread (L, 3H) blocks in which the kernels add the bias to a batch row of xw (none
    without a bias), and their number: the kernels' thread limit."""
    slots = torch.get_num_threads()
    return (None if bias is None else xw.new_empty(slots, *xw.shape[1:])), slots


def _native_attention(xw: Tensor, bias: Tensor | None, valid: Tensor | None,
                      p: float) -> tuple[Tensor, Tensor, Tensor, int]:
    """The forward kernel on the projection ``xw`` (B, L, 3H) without its bias (added by the
    kernel, xw unchanged): (output, softmax weights, contiguous xw, mask seed)."""
    b, length, h3 = xw.shape
    h = h3 // 3
    xw = xw.contiguous()
    out, weights = xw.new_empty(b, length, h), xw.new_empty(b, length, length)
    scratch, slots = _scratch(xw, bias)
    seed = draw_seed(p)
    mask = None if valid is None else valid.contiguous().view(torch.uint8)
    kernels().rla_attention(xw.data_ptr(), None if bias is None else bias.data_ptr(),
                            None if mask is None else mask.data_ptr(), out.data_ptr(),
                            weights.data_ptr(), None if scratch is None else scratch.data_ptr(),
                            slots, b, length, h, h ** -0.5, *mask_args(seed, p))
    return out, weights, xw, seed


class _NativeAttention(torch.autograd.Function):
    """softmax(Q Kᵀ/√H, keys where ``valid``) with dropout p on the weights, times V, from the
    packed (B, L, 3H) projection xw + bias (see `_native_attention`; bias None: none); backward
    returns the gradients of xw and the bias."""

    @staticmethod
    def forward(ctx, xw: Tensor, bias: Tensor | None, valid: Tensor | None,  # type: ignore[override]
                p: float) -> Tensor:
        out, weights, xw, ctx.seed = _native_attention(xw, bias, valid, p)
        ctx.p = p
        ctx.save_for_backward(xw, bias, weights)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, None, None]:  # type: ignore[override]
        xw, bias, weights = ctx.saved_tensors
        return (*_native_attention_backward(xw, bias, weights, grad.contiguous(), ctx.seed,
                                            ctx.p, ctx.needs_input_grad[1]), None, None)


def _native_attention_backward(xw: Tensor, bias: Tensor | None, weights: Tensor, grad: Tensor,
                               seed: int, p: float,
                               need_bias: bool = True) -> tuple[Tensor, Tensor | None]:
    """The backward kernel from the forward's xw, bias and weights and the contiguous (B, L, H)
    output gradient: (gradient of xw, of the bias or None)."""
    b, length, h3 = xw.shape
    h = h3 // 3
    dqkv = torch.empty_like(xw)
    dbias = xw.new_empty(h3) if need_bias and bias is not None else None
    scratch, slots = _scratch(xw, bias)
    kernels().rla_attention_backward(
        xw.data_ptr(), None if bias is None else bias.data_ptr(), weights.data_ptr(),
        grad.data_ptr(), dqkv.data_ptr(), None if dbias is None else dbias.data_ptr(),
        None if scratch is None else scratch.data_ptr(), slots, b, length, h, h ** -0.5,
        *mask_args(seed, p))
    return dqkv, dbias


class _NativeTransformerLayer(torch.autograd.Function):
    """The whole training layer (CPU float32, one head; ``native``: L within the attention
    kernel, else `_LongSingleHeadAttention`'s products) as one autograd node: the four products
    and the kernels of the unfused path (attention, residual LayerNorms, bias+GELU+dropout; same
    masks, drawn in the same order), with a hand-written backward. Each residual input's two
    gradients (through the LayerNorm and through the next product) are summed by the product
    itself (``addmm_`` into the LayerNorm's dx) instead of by autograd's separate pass, and the
    layer is one Python backward call instead of four kernel Functions and four product nodes."""

    @staticmethod
    def forward(ctx, x: Tensor, valid: Tensor | None, native: bool, p: float, eps1: float,  # type: ignore[override]
                eps2: float, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor,
                g1: Tensor, be1: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                g2: Tensor, be2: Tensor) -> Tensor:
        b, length, h = x.shape
        x = x.contiguous()
        rows = x.view(-1, h)
        if native:
            a, attn_w, xw, attn_seed = _native_attention(
                torch.mm(rows, w_in.t()).view(b, length, 3 * h), b_in, valid, p)
            kept = None
        else:  # xw = qkv, the bias added by the product (the batched products read it)
            xw = torch.addmm(b_in, rows, w_in.t()).view(b, length, 3 * h)
            a, attn_w, kept, attn_seed = _long_attention(xw, valid, p)
        a = a.view(-1, h)
        x1, xhat1, rstd1, ln1_seed = _add_dropout_layernorm(
            rows, torch.mm(a, w_out.t()), b_out, g1, be1, p, eps1, False)
        u = torch.mm(x1, w1.t())
        gelu_seed = draw_seed(p)
        f = _bias_gelu_dropout(u, b1, gelu_seed, p)
        y, xhat2, rstd2, ln2_seed = _add_dropout_layernorm(
            x1, torch.mm(f, w2.t()), b2, g2, be2, p, eps2, False)
        ctx.p, ctx.seeds = p, (attn_seed, ln1_seed, gelu_seed, ln2_seed)
        ctx.save_for_backward(rows, xw, attn_w, kept, a, xhat1, rstd1, x1, u, f, xhat2, rstd2,
                              w_in, b_in, w_out, b_out, g1, w1, b1, w2, b2, g2)
        return y.view(b, length, h)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (rows, xw, attn_w, kept, a, xhat1, rstd1, x1, u, f, xhat2, rstd2,
         w_in, b_in, w_out, b_out, g1, w1, b1, w2, b2, g2) = ctx.saved_tensors
        p, (attn_seed, ln1_seed, gelu_seed, ln2_seed) = ctx.p, ctx.seeds
        b, length, h3 = xw.shape
        h = h3 // 3
        dx1, dz2, db2, dg2, dbe2 = _add_dropout_layernorm_backward(
            grad.contiguous().view(-1, h), xhat2, rstd2, g2, None, b2, ln2_seed, p, False)
        dw2 = torch.mm(dz2.t(), f)
        du, db1 = _bias_gelu_dropout_backward(torch.mm(dz2, w2), u, b1, gelu_seed, p)
        dw1 = torch.mm(du.t(), x1)
        dx1.addmm_(du, w1)  # the residual's gradient plus linear1's
        dx, dz1, db_out, dg1, dbe1 = _add_dropout_layernorm_backward(
            dx1, xhat1, rstd1, g1, None, b_out, ln1_seed, p, False)
        dw_out = torch.mm(dz1.t(), a)
        da = torch.mm(dz1, w_out).view(b, length, h)
        if kept is None:
            dxw, db_in = _native_attention_backward(xw, b_in, attn_w, da, attn_seed, p)
            dxw = dxw.view(-1, h3)
        else:
            dxw = _long_attention_backward(xw, attn_w, kept, da, attn_seed, p).view(-1, h3)
            db_in = dxw.sum(0)
        dw_in = torch.mm(dxw.t(), rows)
        dx.addmm_(dxw, w_in)  # the residual's gradient plus the QKV projection's
        return (dx.view(b, length, h), None, None, None, None, None, dw_in, db_in, dw_out,
                db_out, dg1, dbe1, dw1, db1, dw2, db2, dg2, dbe2)


class _LongSingleHeadAttention(torch.autograd.Function):
    """Single-head attention with dropout for sequences too long for `rla_attention` (CPU float32,
    the kernels present): torch's batched products on strided views of the packed (B, L, 3H)
    projection and the softmax+dropout kernel, which also applies the 1/√H scale. Backward writes
    dQ, dK and dV straight into the packed gradient. Autograd's version of the same graph scaled
    a copy of Q, and its split backward concatenated the three gradients: 13 ms for one (43, 376,
    256) Humanoid micro-batch, more than one of its batched products (9 ms). Humanoid's d_model
    256 training step measured 6 % faster."""

    @staticmethod
    def forward(ctx, qkv: Tensor, valid: Tensor | None, p: float) -> Tensor:  # type: ignore[override]
        out, w, kept, ctx.seed = _long_attention(qkv, valid, p)
        ctx.p = p
        ctx.save_for_backward(qkv, w, kept)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        qkv, w, kept = ctx.saved_tensors
        return _long_attention_backward(qkv, w, kept, grad, ctx.seed, ctx.p), None, None


def _long_attention(qkv: Tensor, valid: Tensor | None,
                    p: float) -> tuple[Tensor, Tensor, Tensor, int]:
    """`_LongSingleHeadAttention`'s forward on the contiguous packed qkv: (output, softmax
    weights, weights after dropout, mask seed)."""
    h = qkv.shape[-1] // 3
    q, k, v = qkv.split(h, dim=-1)
    scores = torch.bmm(q, k.transpose(1, 2))
    if valid is not None:
        scores.masked_fill_(~valid[:, None, :], float("-inf"))
    w, kept, seed = softmax_dropout_forward(scores, p, h ** -0.5)
    return torch.bmm(kept, v), w, kept, seed


def _long_attention_backward(qkv: Tensor, w: Tensor, kept: Tensor, grad: Tensor, seed: int,
                             p: float) -> Tensor:
    """The gradient of the packed qkv from the output's (contiguous)."""
    h = qkv.shape[-1] // 3
    q, k, v = qkv.split(h, dim=-1)
    dqkv = torch.empty_like(qkv)
    dq, dk, dv = dqkv.split(h, dim=-1)  # bmm writes into these strided views in place
    torch.bmm(kept.transpose(1, 2), grad, out=dv)
    ds = softmax_dropout_backward(torch.bmm(grad, v.transpose(1, 2)), w, seed, p, h ** -0.5)
    torch.bmm(ds, k, out=dq)
    torch.bmm(ds.transpose(1, 2), q, out=dk)
    return dqkv


class TransformerLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        # Same init as nn.MultiheadAttention (xavier on the packed projection, zero biases).
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """x (B, L, H) → (B, L, H). ``valid`` (B, L) bool: the positions that take part as keys
        (sequences of different lengths padded at the end); None = all."""
        b, length, h = x.shape
        p = self.dropout if self.training else 0.0
        native = (self.n_heads == 1
                  and length <= min(NATIVE_ATTENTION_MAX_LEN, _ATTENTION_KERNEL_MAX_LEN)
                  and use_native(x, p))
        if (valid is None and not self.training and not torch.is_grad_enabled()
                and _FUSED_INFERENCE):
            # Acting: torch's fused layer (its four products called from C++) measured faster at
            # batch 8 than this layer's ops with the compiled kernels (HalfCheetah 5.1 vs 5.5 ms)
            return self._fused_inference(x)
        # With the kernels the biases go to the kernel after each product (see dropout.py).
        fuse_bias = fuses_bias(x, p)
        if fuse_bias and self._fuses_layer(x, p, native):
            return _NativeTransformerLayer.apply(
                x, None if valid is None else valid.contiguous(), native, p, self.norm1.eps,
                self.norm2.eps, self.in_proj.weight, self.in_proj.bias, self.out_proj.weight,
                self.out_proj.bias, self.norm1.weight, self.norm1.bias, self.linear1.weight,
                self.linear1.bias, self.linear2.weight, self.linear2.bias, self.norm2.weight,
                self.norm2.bias)
        if native:
            xw = F.linear(x, self.in_proj.weight)
            bias = self.in_proj.bias
            a = (_NativeAttention.apply(xw, bias, valid, p) if needs_graph(xw, bias)
                 else _native_attention(xw, bias, valid, p)[0])
        elif p > 0.0 and x.device.type == "cpu":
            qkv = self.in_proj(x)
            # Fused CPU kernels have no dropout, and torch's fallback draws its mask ~4x slower.
            a = self._attention_with_dropout(qkv, p, valid)
        else:
            qkv = self.in_proj(x)
            q, k, v = qkv.view(b, length, 3, self.n_heads, h // self.n_heads).permute(2, 0, 3, 1, 4)
            mask = None if valid is None else valid[:, None, None, :]
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            a = a.transpose(1, 2).reshape(b, length, h)
        z, z_bias = linear_leaving_bias(self.out_proj, a, fuse_bias)
        x = add_dropout_layernorm(x, z, self.norm1, p, self.training, z_bias=z_bias)
        u, u_bias = linear_leaving_bias(self.linear1, x, fuse_bias)
        f = gelu_dropout(u, p, self.training, bias=u_bias)
        z, z_bias = linear_leaving_bias(self.linear2, f, fuse_bias)
        return add_dropout_layernorm(x, z, self.norm2, p, self.training, z_bias=z_bias)

    def _fuses_layer(self, x: Tensor, p: float, native: bool) -> bool:
        """Whether training runs as `_NativeTransformerLayer`: the attention is the compiled
        kernel's (``native``) or, with dropout, `_LongSingleHeadAttention`'s; autograd records
        the layer, every parameter is a float32 CPU tensor like x (and trained: the node returns
        every gradient), sizes fit the kernels' 32-bit indices."""
        b, length, h = x.shape
        if not (native or (self.n_heads == 1 and p > 0.0 and b * length * length < 2**32)):
            return False
        return (trains_in_one_node(x, list(self.parameters()))
                and b * length * max(3 * h, self.linear1.out_features) < 2**32)

    def _attention_with_dropout(self, qkv: Tensor, p: float, valid: Tensor | None) -> Tensor:
        b, length, h3 = qkv.shape
        h, nh = h3 // 3, self.n_heads
        if nh == 1:
            if needs_graph(qkv) and use_native(qkv, p) and b * length * length < 2**32:
                return _LongSingleHeadAttention.apply(qkv.contiguous(), valid, p)
            q, k, v = qkv.split(h, dim=-1)  # strided (B, L, H) views: the products need no copies
        else:
            q, k, v = qkv.view(b, length, 3, nh, h // nh).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2)
        if valid is not None:
            keys = valid[:, None, :] if nh == 1 else valid[:, None, None, :]
            scores = scores.masked_fill(~keys, float("-inf"))
        a = softmax_dropout(scores, p, True, scale=(h // nh) ** -0.5) @ v
        return a if nh == 1 else a.transpose(1, 2).reshape(b, length, h)

    def _fused_inference(self, x: Tensor) -> Tensor:
        # The native kernel behind nn.TransformerEncoderLayer's inference fast path: the whole
        # layer in one call, the same math as the training path.
        return torch._transformer_encoder_layer_fwd(
            x, self.in_proj.in_features, self.n_heads,
            self.in_proj.weight, self.in_proj.bias, self.out_proj.weight, self.out_proj.bias,
            True, False, self.norm1.eps, self.norm1.weight, self.norm1.bias,
            self.norm2.weight, self.norm2.bias, self.linear1.weight, self.linear1.bias,
            self.linear2.weight, self.linear2.bias, None, None,
        )

    def to_reference(self) -> nn.TransformerEncoderLayer:
        """The stock torch layer carrying these weights."""
        ref = nn.TransformerEncoderLayer(
            self.in_proj.in_features,
            self.n_heads,
            self.linear1.out_features,
            self.dropout,
            activation="gelu",
            batch_first=True,
        )
        ref.self_attn.in_proj_weight.data.copy_(self.in_proj.weight.data)
        ref.self_attn.in_proj_bias.data.copy_(self.in_proj.bias.data)
        ref.self_attn.out_proj.load_state_dict(self.out_proj.state_dict())
        for name in ("linear1", "linear2", "norm1", "norm2"):
            getattr(ref, name).load_state_dict(getattr(self, name).state_dict())
        return ref.train(self.training)
