"""IKDDiT networks: DiT teacher, MaskDiT-style masked student, unified contrastive embedding, implicit
discriminator.

Networks only: no noise schedule, no losses, no training loop (see models/diffusion.py, trainers/ikddit.py).
Layout follows facebookresearch/DiT models.py: embedding layers, core blocks, the two transformers, the
discriminator, sin-cos positional embeddings, then a size registry (``DIT_SIZES``) and ``build_dit`` that the
CLI, configs and Tune read.

Data the networks see (overlay maps):
    x             (N, C, H, W) float   overlay map (dx, dy) normalised, or its noisy version; C=2, H=W=32
    t             (N,)                 diffusion timestep (integers in [0, 1000) for DDPM; any float works)
    log           (N, log_dim) float   standardised equipment-log vector, log_dim = 128 by default
    equipment_id  (N,) int64           in [0, num_ids)

Conditioning is computed OUTSIDE the transformers by ``ContrastiveEmbedding``, so teacher and student share
one module:
    cond_tokens   (N, K, D_ctx)        K = 3 tokens [log, id, fused context] for gated cross-attention
    cond_vec      (N, D_ctx)           pooled condition (the fused context token), added to the timestep
                                       embedding for adaLN
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention

__all__ = [
    "DIT_SIZES",
    "NUM_COND_TOKENS",
    "ContrastiveEmbedding",
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "GatedCrossAttention",
    "ImplicitDiscriminator",
    "MaskedStudentDiT",
    "TimestepEmbedder",
    "build_dit",
    "get_2d_sincos_pos_embed",
    "patchify",
    "random_masking",
    "unpatchify",
]

NUM_COND_TOKENS = 3  # [log token, id token, fused context token]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (N, L, D), shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _approx_gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")


def _check_mask_ratio(mask_ratio: float) -> float:
    is_real = isinstance(mask_ratio, numbers.Real) and not isinstance(mask_ratio, bool)
    if not is_real or not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be a float in [0, 1), got {mask_ratio!r}")
    return float(mask_ratio)


#################################################################################
#               Embedding Layers for Timesteps and Conditions                   #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (N,) -> (N, hidden_size): sinusoidal frequencies, then a 2-layer SiLU MLP (as DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal embedding of (N,) possibly fractional timesteps -> (N, dim)."""
        half = dim // 2
        steps = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * steps / half)  # (half,)
        args = t[:, None].float() * freqs[None]  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2*half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, F)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class ContrastiveEmbedding(nn.Module):
    """Unified contrastive embedding: overlay image, equipment log and equipment ID in one space of width
    ``embed_dim``.

    - log encoder:   MLP(log) -> LayerNorm                            -> log token
    - ID encoder:    Embedding(num_ids, embed_dim)                    -> id token
    - context:       z_context = LayerNorm(MLP(log) + Embedding(id))  -> fused token (the authors' intent,
                     their Linear generalised to an MLP); also ``cond_vec``, the pooled condition for adaLN
    - image encoder: 2 strided convs -> spatial mean -> MLP -> LayerNorm -> z_image (training only, for
                     InfoNCE against z_context; the trainer L2-normalises both). It never feeds the condition
                     tokens, so sampling needs no image.

    Classifier-free-guidance dropout: rows where ``drop`` is True get learned null tokens (one per slot) in
    ``cond_tokens``; ``cond_vec`` is always the fused slot, so it is nulled with them. ``z_context`` is never
    dropped: InfoNCE aligns real contexts.
    """

    def __init__(
        self,
        log_dim: int = 128,       # width of the standardised equipment-log vector
        num_ids: int = 1000,      # number of distinct equipment / lot IDs
        embed_dim: int = 512,     # width of the shared space (D_ctx)
        in_channels: int = 2,     # channels of the overlay map (dx, dy)
        image_width: int = 64,    # channels of the image encoder's second conv
    ):
        super().__init__()
        if log_dim < 1 or num_ids < 1 or embed_dim < 1:
            raise ValueError(
                f"log_dim, num_ids, embed_dim must be >= 1, got {log_dim}, {num_ids}, {embed_dim}"
            )
        self.log_dim, self.num_ids, self.embed_dim = log_dim, num_ids, embed_dim
        self.in_channels = in_channels
        self.num_tokens = NUM_COND_TOKENS
        self.log_mlp = Mlp(log_dim, embed_dim, embed_dim, act_layer=nn.GELU)
        self.log_norm = nn.LayerNorm(embed_dim)
        self.id_embed = nn.Embedding(num_ids, embed_dim)
        self.context_norm = nn.LayerNorm(embed_dim)
        half = max(image_width // 2, 1)
        self.image_conv = nn.Sequential(
            nn.Conv2d(in_channels, half, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(half, image_width, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        self.image_mlp = Mlp(image_width, embed_dim, embed_dim, act_layer=nn.GELU)
        self.image_norm = nn.LayerNorm(embed_dim)
        self.null_tokens = nn.Parameter(torch.zeros(NUM_COND_TOKENS, embed_dim))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.id_embed.weight, std=0.02)
        nn.init.normal_(self.null_tokens, std=0.02)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> z_image (N, D)."""
        h = self.image_conv(image).mean(dim=(2, 3))  # (N, W_img)
        return self.image_norm(self.image_mlp(h))  # (N, D)

    def forward(
        self,
        log: torch.Tensor,
        equipment_id: torch.Tensor,
        image: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Returns dict(cond_tokens (N, 3, D), cond_vec (N, D), z_context (N, D)[, z_image (N, D)]).

        log (N, log_dim) float; equipment_id (N,) int in [0, num_ids); image (N, C, H, W) or None;
        drop (N,) bool or None: True -> that row's condition tokens are replaced by the learned null tokens.
        """
        if log.dim() != 2 or log.shape[1] != self.log_dim:
            raise ValueError(f"log must have shape (N, {self.log_dim}), got {tuple(log.shape)}")
        n = log.shape[0]
        if equipment_id.shape != (n,):
            raise ValueError(
                f"equipment_id must have shape ({n},) to match log, got {tuple(equipment_id.shape)}"
            )
        if equipment_id.dtype.is_floating_point or equipment_id.dtype == torch.bool:
            raise ValueError(f"equipment_id must be an integer tensor, got dtype {equipment_id.dtype}")
        if n and (int(equipment_id.min()) < 0 or int(equipment_id.max()) >= self.num_ids):
            raise ValueError(
                f"equipment_id must lie in [0, {self.num_ids}), got range "
                f"[{int(equipment_id.min())}, {int(equipment_id.max())}]"
            )
        log_h = self.log_mlp(log)  # (N, D)
        log_tok = self.log_norm(log_h)  # (N, D)
        id_tok = self.id_embed(equipment_id.long())  # (N, D)
        z_context = self.context_norm(log_h + id_tok)  # (N, D)
        cond_tokens = torch.stack([log_tok, id_tok, z_context], dim=1)  # (N, 3, D)
        if drop is not None:
            if drop.shape != (n,) or drop.dtype != torch.bool:
                raise ValueError(
                    f"drop must be a bool tensor of shape ({n},), got {drop.dtype} {tuple(drop.shape)}"
                )
            null = self.null_tokens.unsqueeze(0).expand(n, -1, -1)  # (N, 3, D)
            cond_tokens = torch.where(drop[:, None, None], null, cond_tokens)  # (N, 3, D)
        out = {"cond_tokens": cond_tokens, "cond_vec": cond_tokens[:, -1], "z_context": z_context}
        if image is not None:
            if image.dim() != 4 or image.shape[0] != n or image.shape[1] != self.in_channels:
                raise ValueError(
                    f"image must have shape ({n}, {self.in_channels}, H, W), got {tuple(image.shape)}"
                )
            out["z_image"] = self.encode_image(image)  # (N, D)
        return out


#################################################################################
#                                 Core DiT Blocks                               #
#################################################################################


class GatedCrossAttention(nn.Module):
    """x + sigmoid(Linear(LN(x))) * MHA(LN(x), ctx, ctx): tokens (N, L, D) attend to condition tokens
    (N, K, D_ctx).

    The output projection is zero-initialised (in ``_DiTBase.initialize_weights``), so the block starts as the
    identity, as adaLN-Zero does for the self-attention, while the sigmoid gate starts half open (bias 0)
    in its linear range: closing the gate with a very negative bias would instead saturate the sigmoid and
    starve the gate of gradient.
    """

    def __init__(self, dim: int, ctx_dim: int, num_heads: int, attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.attn_drop = num_heads, dim // num_heads, attn_drop
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(ctx_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        k_len = ctx.shape[1]
        h = self.norm(x)  # (N, L, D)
        q = self.q(h).reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, L, d)
        kv = self.kv(ctx).reshape(n, k_len, 2, self.num_heads, self.head_dim)  # (N, K, 2, H, d)
        k, v = kv.permute(2, 0, 3, 1, 4)  # (N, H, K, d) each
        drop = self.attn_drop if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # (N, H, L, d)
        a = self.proj(a.transpose(1, 2).reshape(n, length, d))  # (N, L, D)
        return x + torch.sigmoid(self.gate(h)) * a  # (N, L, D)


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, gated cross-attention to the condition tokens, adaLN-Zero MLP;
    modulated by c (N, D)."""

    def __init__(
        self, hidden_size: int, num_heads: int, ctx_dim: int, mlp_ratio: float = 4.0, attn_drop: float = 0.0
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, attn_drop=attn_drop)
        self.cross = GatedCrossAttention(hidden_size, ctx_dim, num_heads, attn_drop=attn_drop)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=_approx_gelu, drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        mod = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, L, D)
        x = self.cross(x, ctx)  # (N, L, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, L, D)
        return x


class FinalLayer(nn.Module):
    """adaLN then a linear map of each token to its patch: (N, L, D) -> (N, L, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, L, p*p*C)


#################################################################################
#                         Patches and random masking                            #
#################################################################################


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C) with L = (H/p)(W/p), row-major patches; each patch ordered (p, p, C).

    The same ordering as ``unpatchify`` and the final layer, so per-patch losses line up with ``mask`` (N, L).
    """
    if x.dim() != 4 or x.shape[2] % p or x.shape[3] % p:
        raise ValueError(f"patchify needs (N, C, H, W) with H, W divisible by p={p}, got {tuple(x.shape)}")
    n, c, hh, ww = x.shape
    h, w = hh // p, ww // p
    x = x.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (N, h, w, p, p, C)
    return x.reshape(n, h * w, p * p * c)  # (N, L, p*p*C)


def unpatchify(tokens: torch.Tensor, p: int, C: int, H: int, W: int) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W); inverse of ``patchify``."""
    h, w = H // p, W // p
    if H % p or W % p or tokens.dim() != 3 or tokens.shape[1] != h * w or tokens.shape[2] != p * p * C:
        raise ValueError(
            f"unpatchify expected tokens (N, {h * w}, {p * p * C}) for p={p}, C={C}, H={H}, W={W}, "
            f"got {tuple(tokens.shape)}"
        )
    n = tokens.shape[0]
    x = tokens.reshape(n, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, p)
    return x.reshape(n, C, H, W)


def random_masking(
    n: int,
    L: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MaskDiT/MAE random masking: keep ``int(L * (1 - mask_ratio))`` tokens per sample by random shuffle.

    Returns ids_keep (N, L_keep) int64, ids_restore (N, L) int64 (argsort of the shuffle: gathering
    [kept, masked] tokens with it restores the grid), mask (N, L) bool, True where masked.
    mask_ratio = 0 keeps every token in order and draws no random numbers.
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    return random_masking_many([n], [generator], L, mask_ratio, device)


def random_masking_many(
    sizes: list[int],
    generators: list[torch.Generator | None],
    L: int,
    mask_ratio: float,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`random_masking` for consecutive groups of rows, group i (``sizes[i]`` rows) drawing from
    ``generators[i]``: rows get exactly the masks each group would get alone, with one shuffle for all.

    Returns ids_keep (N, L_keep), ids_restore (N, L), mask (N, L) as random_masking, N = sum(sizes).
    """
    if len(sizes) != len(generators):
        raise ValueError(f"need one generator per group: {len(sizes)} sizes, {len(generators)} generators")
    mask_ratio = _check_mask_ratio(mask_ratio)
    len_keep = int(L * (1 - mask_ratio))
    if len_keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no token of L={L}; lower mask_ratio")
    n = sum(sizes)
    if len_keep == L:
        ids_shuffle = torch.arange(L, device=device).expand(n, L)
    else:
        # Each group's draw on its generator's own device (torch requires it), then one device for all.
        noise = torch.cat([torch.rand(k, L, generator=g, device=g.device if g is not None else device).to(device)
                           for k, g in zip(sizes, generators)])  # (N, L)
        ids_shuffle = torch.argsort(noise, dim=1)  # (N, L), ascending: the first len_keep are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (N, L)
    ids_keep = ids_shuffle[:, :len_keep].contiguous()  # (N, L_keep)
    mask = torch.ones(n, L, dtype=torch.bool, device=device)
    mask[:, :len_keep] = False
    mask = torch.gather(mask, 1, ids_restore)  # (N, L) in grid order
    return ids_keep, ids_restore, mask


#################################################################################
#                          Teacher and masked student                           #
#################################################################################


class _DiTBase(nn.Module):
    """Shared stem and head of teacher and student: patch/pos/timestep/condition embeddings, final layer."""

    def __init__(
        self,
        input_size: int = 32,      # H = W of the map
        patch_size: int = 2,       # side of a square patch
        in_channels: int = 2,      # (dx, dy); the output has the same channels (eps prediction)
        hidden_size: int = 384,    # token width D
        depth: int = 12,           # transformer blocks (the student's encoder blocks)
        num_heads: int = 6,        # attention heads
        mlp_ratio: float = 4.0,    # MLP hidden width / D
        ctx_dim: int = 384,        # width of cond_tokens / cond_vec (ContrastiveEmbedding.embed_dim)
        attn_drop: float = 0.0,    # attention dropout (the published IKDDiT uses 0.1)
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels, self.hidden_size, self.ctx_dim = in_channels, hidden_size, ctx_dim
        self.num_heads = num_heads
        self.mlp_ratio, self.attn_drop = mlp_ratio, attn_drop
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.num_patches = self.x_embedder.num_patches
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.c_embedder = Mlp(ctx_dim, hidden_size, hidden_size, act_layer=nn.SiLU)
        # Fixed 2-D sin-cos positional embedding; a non-persistent buffer: recomputed, never loaded.
        pos = get_2d_sincos_pos_embed(hidden_size, input_size // patch_size)
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)  # (1, L, D)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, ctx_dim, mlp_ratio, attn_drop) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def _init_common(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data  # initialise the patch conv like a Linear (as DiT)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            self._zero_block(block)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @staticmethod
    def _zero_block(block: DiTBlock) -> None:
        # adaLN-Zero: every residual branch starts closed, so each block starts as the identity.
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(block.cross.proj.weight)
        nn.init.zeros_(block.cross.proj.bias)

    def _check_inputs(
        self, x: torch.Tensor, t: torch.Tensor, cond_tokens: torch.Tensor, cond_vec: torch.Tensor
    ) -> torch.Tensor:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        n = x.shape[0]
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"t must have shape ({n},) to match x, got {tuple(t.shape)}")
        if cond_tokens.dim() != 3 or cond_tokens.shape[0] != n or cond_tokens.shape[2] != self.ctx_dim:
            raise ValueError(
                f"cond_tokens must have shape ({n}, K, {self.ctx_dim}), got {tuple(cond_tokens.shape)}"
            )
        if cond_vec.shape != (n, self.ctx_dim):
            raise ValueError(f"cond_vec must have shape ({n}, {self.ctx_dim}), got {tuple(cond_vec.shape)}")
        return t

    def _embed(
        self, x: torch.Tensor, t: torch.Tensor, cond_vec: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x_embedder(x) + self.pos_embed  # (N, L, D)
        c = self.t_embedder(t) + self.c_embedder(cond_vec)  # (N, D)
        return x, c

    def _head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = self.final_layer(tokens, c)  # (N, L, p*p*C)
        size = self.input_size
        return unpatchify(out, self.patch_size, self.out_channels, size, size)  # (N, C, H, W)


class DiT(_DiTBase):
    """Teacher: a DiT over ALL patch tokens, conditioned by adaLN (t + cond_vec) and gated cross-attention
    (cond_tokens)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        self._init_common()

    def forward_tokens(
        self, x: torch.Tensor, t: torch.Tensor, cond_tokens: torch.Tensor, cond_vec: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (eps prediction (N, C, H, W), hidden tokens before the final layer (N, L, D))."""
        t = self._check_inputs(x, t, cond_tokens, cond_vec)
        h, c = self._embed(x, t, cond_vec)  # (N, L, D), (N, D)
        for block in self.blocks:
            h = block(h, c, cond_tokens)  # (N, L, D)
        return self._head(h, c), h

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond_tokens: torch.Tensor, cond_vec: torch.Tensor
    ) -> torch.Tensor:
        """x (N, C, H, W), t (N,), cond_tokens (N, K, D_ctx), cond_vec (N, D_ctx) -> eps (N, C, H, W)."""
        return self.forward_tokens(x, t, cond_tokens, cond_vec)[0]


class MaskedStudentDiT(_DiTBase):
    """MaskDiT-style student: the encoder (``depth`` blocks) runs on the visible tokens only; a light decoder
    (``decoder_depth`` blocks, same width so its tokens can be compared with the teacher's) puts a learnable
    mask token at the masked positions, restores the grid and predicts the full output. Sampling runs it with
    the same mask ratio, so every step costs ~(1 - mask_ratio) of the encoder plus the light decoder.

    Parameter names of the stem, ``blocks`` and ``final_layer`` match ``DiT``'s, so ``init_from_teacher`` can
    copy a same-size teacher into the encoder.
    """

    def __init__(self, decoder_depth: int = 2, **kwargs):
        super().__init__(**kwargs)
        if decoder_depth < 1:
            raise ValueError(
                f"decoder_depth must be >= 1 (the decoder restores the grid), got {decoder_depth}"
            )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.hidden_size))
        self.decoder_blocks = nn.ModuleList(
            [
                DiTBlock(self.hidden_size, self.num_heads, self.ctx_dim, self.mlp_ratio, self.attn_drop)
                for _ in range(decoder_depth)
            ]
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        self._init_common()
        for block in self.decoder_blocks:
            self._zero_block(block)
        nn.init.normal_(self.mask_token, std=0.02)

    @torch.no_grad()
    def init_from_teacher(self, teacher: DiT) -> list[str]:
        """Copy every same-named, same-shaped tensor of ``teacher`` (stem, encoder blocks, final layer).

        Returns the copied keys."""
        own, theirs = self.state_dict(), teacher.state_dict()
        copied = [k for k, v in theirs.items() if k in own and own[k].shape == v.shape]
        for k in copied:
            own[k].copy_(theirs[k])
        return copied

    def forward_encoder(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond_tokens: torch.Tensor,
        cond_vec: torch.Tensor,
        ids_keep: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed, add pos-embed, keep ``ids_keep`` (N, L_keep) tokens, run the encoder on them.

        Returns (visible tokens (N, L_keep, D), c (N, D)). Inputs are assumed checked (see ``forward``).
        """
        h, c = self._embed(x, t, cond_vec)  # (N, L, D)
        idx = ids_keep.unsqueeze(-1).expand(-1, -1, h.shape[-1])  # (N, L_keep, D)
        h = torch.gather(h, 1, idx)  # (N, L_keep, D): the encoder never sees the masked tokens
        for block in self.blocks:
            h = block(h, c, cond_tokens)  # (N, L_keep, D)
        return h, c

    def forward_decoder(
        self, h: torch.Tensor, ids_keep: torch.Tensor, c: torch.Tensor, cond_tokens: torch.Tensor
    ) -> torch.Tensor:
        """Scatter visible tokens (N, L_keep, D) back to the grid, mask tokens elsewhere, run the decoder.

        Returns decoder tokens (N, L, D)."""
        n, _, d = h.shape
        full = self.mask_token.to(h.dtype).expand(n, self.num_patches, d)  # (N, L, D)
        idx = ids_keep.unsqueeze(-1).expand(-1, -1, d)  # (N, L_keep, D)
        full = full.scatter(1, idx, h)  # (N, L, D): unshuffle
        full = full + self.pos_embed  # decoder positions (mask tokens carry no position otherwise)
        for block in self.decoder_blocks:
            full = block(full, c, cond_tokens)  # (N, L, D)
        return full

    def _check_ids_keep(self, ids_keep: torch.Tensor, n: int) -> torch.Tensor:
        L = self.num_patches
        if ids_keep.dim() != 2 or ids_keep.shape[0] != n or not 1 <= ids_keep.shape[1] <= L:
            raise ValueError(
                f"ids_keep must have shape ({n}, L_keep) with 1 <= L_keep <= {L}, got {tuple(ids_keep.shape)}"
            )
        if ids_keep.dtype.is_floating_point or ids_keep.dtype == torch.bool:
            raise ValueError(f"ids_keep must be an integer tensor, got dtype {ids_keep.dtype}")
        ids_keep = ids_keep.long()
        if int(ids_keep.min()) < 0 or int(ids_keep.max()) >= L:
            raise ValueError(f"ids_keep values must lie in [0, {L})")
        srt = ids_keep.sort(dim=1).values
        if ids_keep.shape[1] > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("ids_keep must not repeat a token index within a row")
        return ids_keep

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond_tokens: torch.Tensor,
        cond_vec: torch.Tensor,
        mask_ratio: float = 0.5,
        generator: torch.Generator | None = None,
        ids_keep: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """x (N, C, H, W), t (N,), cond_tokens (N, K, D_ctx), cond_vec (N, D_ctx).

        Keeps ``int(L * (1 - mask_ratio))`` random tokens per sample (``generator`` makes it reproducible), or
        exactly ``ids_keep`` (N, L_keep) when given (then mask_ratio is only validated; the kept count
        comes from ids_keep).
        Returns dict(out (N, C, H, W), tokens (N, L, D) decoder tokens before the final layer,
        mask (N, L) bool True where masked, ids_keep (N, L_keep)).
        """
        mask_ratio = _check_mask_ratio(mask_ratio)
        t = self._check_inputs(x, t, cond_tokens, cond_vec)
        n, L = x.shape[0], self.num_patches
        if ids_keep is None:
            ids_keep, _, mask = random_masking(n, L, mask_ratio, generator=generator, device=x.device)
        else:
            ids_keep = self._check_ids_keep(ids_keep.to(x.device), n)
            mask = torch.ones(n, L, dtype=torch.bool, device=x.device).scatter(1, ids_keep, False)
        h, c = self.forward_encoder(x, t, cond_tokens, cond_vec, ids_keep)  # (N, L_keep, D)
        tokens = self.forward_decoder(h, ids_keep, c, cond_tokens)  # (N, L, D)
        return {"out": self._head(tokens, c), "tokens": tokens, "mask": mask, "ids_keep": ids_keep}


#################################################################################
#                             Implicit discriminator                            #
#################################################################################


class _DiscBlock(nn.Module):
    """Pre-LN transformer block (timm Attention + Mlp)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (N, L, d)
        return x + self.mlp(self.norm2(x))  # (N, L, d)


class ImplicitDiscriminator(nn.Module):
    """Token-level discriminator: hidden tokens (N, L, D) [+ timestep t (N,)] -> per-token logits (N, L).

    Trained to call teacher tokens real and student tokens fake at the same grid positions, which aligns the
    student's decoder tokens with the teacher's. Positions enter as a fixed sin-cos embedding, the timestep
    through an embedding added to every token (the token statistics change strongly with the noise level).
    """

    def __init__(
        self,
        token_dim: int,            # D of the tokens it judges (teacher and student share it)
        grid_size: int,            # tokens form a grid_size x grid_size grid (L = grid_size**2)
        hidden_size: int = 128,    # width inside the discriminator
        depth: int = 2,            # transformer blocks
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(
                f"discriminator hidden_size {hidden_size} must be divisible by num_heads {num_heads}"
            )
        self.token_dim, self.num_tokens = token_dim, grid_size * grid_size
        self.in_norm = nn.LayerNorm(token_dim)
        self.in_proj = nn.Linear(token_dim, hidden_size)
        pos = get_2d_sincos_pos_embed(hidden_size, grid_size).unsqueeze(0)  # (1, L, d)
        self.register_buffer("pos_embed", pos, persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.blocks = nn.ModuleList([_DiscBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.out_norm = nn.LayerNorm(hidden_size)
        self.head = nn.Linear(hidden_size, 1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)  # start near logit 0 (undecided)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (N, L, D), t (N,) or None -> logits (N, L)."""
        if tokens.dim() != 3 or tokens.shape[1] != self.num_tokens or tokens.shape[2] != self.token_dim:
            raise ValueError(
                f"tokens must have shape (N, {self.num_tokens}, {self.token_dim}), got {tuple(tokens.shape)}"
            )
        h = self.in_proj(self.in_norm(tokens)) + self.pos_embed  # (N, L, d)
        if t is not None:
            if t.shape != (tokens.shape[0],):
                raise ValueError(f"t must have shape ({tokens.shape[0]},), got {tuple(t.shape)}")
            h = h + self.t_embedder(t).unsqueeze(1)  # (N, L, d)
        for block in self.blocks:
            h = block(h)  # (N, L, d)
        return self.head(self.out_norm(h)).squeeze(-1)  # (N, L)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################


def _1d_sincos(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0))  # (D/2,)
    out = pos.reshape(-1, 1).double() * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding -> (grid_size**2, embed_dim) float32, row-major like patches.

    Half the channels encode the row, half the column (as DiT/MAE). embed_dim must be divisible by 4.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos positional embedding needs embed_dim divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    emb = torch.cat([_1d_sincos(embed_dim // 2, gy), _1d_sincos(embed_dim // 2, gx)], dim=1)  # (G*G, D)
    return emb.float()


#################################################################################
#                                 IKDDiT Configs                                #
#################################################################################

# Named sizes read by the CLI, configs and Tune (keys feed argparse `choices`).
# depth/hidden/heads of S/B/L/XL are DiT's.
# Patch size for our 32x32 overlay maps: patch 2 for S..XL and IKDDiT-S gives 256 tokens (DiT's setting on
# its 32x32 latents; also the grid IKDDiT's patch 16 gives on 256x256 images), 128 visible at mask ratio 0.5.
# Patch 16 on 32x32 would leave 4 tokens (2 visible): nothing left to mask or to attend over. "tiny" uses
# patch 4 (64 tokens) to keep tests and CPU smoke runs fast. decoder_depth follows MaskDiT/MDT (light: 2 for
# small sizes, 8 at XL). embed_dim is the width of the contrastive embedding (D_ctx); disc_* size the
# implicit discriminator.
#
# Where masking pays. Sampling runs the student's encoder on the visible tokens only, its decoder and the
# teacher on all of them, so a step costs the student depth * f + decoder_depth teacher blocks, f being what a
# block costs on the kept tokens relative to all (f ~ 1 - mask_ratio for the matrix products; less for
# attention, and for memory-bound elementwise work that fits the cache at half the tokens). "tiny" (2 encoder
# blocks + 1 decoder block vs 2) is hardly faster than its teacher (~1.1x). "deep" is the CPU-trainable size
# at which the student samples ≥ 2x faster at mask 0.5: 12 narrow encoder blocks (D = 48) on tiny's 64 tokens
# and ONE decoder block: the student needs 0.59 of the teacher's FLOPs, and on 2 CPU cores (random weights,
# batch 256, benchmarks/ikddit_speed.py --size deep) samples 2.34x as many maps/s (half the tokens also fit
# the cache; tiny: ~1.1x). A training step costs ~2x tiny's.
DIT_SIZES: dict[str, dict] = {
    "tiny": dict(depth=2, hidden_size=64, num_heads=2, decoder_depth=1, patch_size=4, embed_dim=64,
                 disc_hidden=64, disc_depth=1, disc_heads=2),
    "deep": dict(depth=12, hidden_size=48, num_heads=2, decoder_depth=1, patch_size=4, embed_dim=64,
                 disc_hidden=64, disc_depth=1, disc_heads=2),
    "S": dict(depth=12, hidden_size=384, num_heads=6, decoder_depth=2, patch_size=2, embed_dim=384,
              disc_hidden=192, disc_depth=2, disc_heads=4),
    "B": dict(depth=12, hidden_size=768, num_heads=12, decoder_depth=2, patch_size=2, embed_dim=512,
              disc_hidden=256, disc_depth=2, disc_heads=4),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, decoder_depth=4, patch_size=2, embed_dim=512,
              disc_hidden=256, disc_depth=2, disc_heads=8),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16, decoder_depth=8, patch_size=2, embed_dim=512,
               disc_hidden=384, disc_depth=2, disc_heads=8),
    # Published IKDDiT config: hidden 512, 12 blocks, 8 heads, attention dropout 0.1, patch 16 on their
    # images, log dim 128 and 1000 IDs (build_dit's defaults). Patch 2 here: see the note above.
    "IKDDiT-S": dict(depth=12, hidden_size=512, num_heads=8, decoder_depth=2, patch_size=2, embed_dim=512,
                     attn_drop=0.1, disc_hidden=256, disc_depth=2, disc_heads=4),
}

_SIZE_DEFAULTS = dict(mlp_ratio=4.0, attn_drop=0.0)


NETWORKS = ("teacher", "student", "embedding", "discriminator")


def dit_config(size: str, patch_size: int | None = None, **overrides) -> dict:
    """The resolved hyperparameters of a named size: ``DIT_SIZES[size]`` with defaults and ``overrides``.

    ``patch_size=None`` takes the size's default. Unknown sizes or override names raise ValueError.
    """
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {size!r}; choose one of {sorted(DIT_SIZES)}")
    cfg = {**_SIZE_DEFAULTS, **DIT_SIZES[size]}
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise ValueError(f"unknown build_dit option(s) {unknown}; known: {sorted(cfg)}")
    cfg.update(overrides)
    if patch_size is not None:
        cfg["patch_size"] = patch_size
    return cfg


def build_network(
    name: str,
    size: str,
    *,
    input_size: int = 32,
    in_channels: int = 2,
    patch_size: int | None = None,
    log_dim: int = 128,
    num_ids: int = 1000,
    **overrides,
) -> nn.Module:
    """Build ONE network of the IKDDiT family (teacher | student | embedding | discriminator) at a named size.

    What inference uses: a served student allocates neither the teacher nor the discriminator. Arguments as
    in :func:`build_dit`; the same arguments give the same architecture as ``build_dit(...)[name]``.
    """
    if name not in NETWORKS:
        raise ValueError(f"unknown IKDDiT network {name!r}; choose one of {NETWORKS}")
    cfg = dit_config(size, patch_size, **overrides)
    common = dict(
        input_size=input_size, patch_size=cfg["patch_size"], in_channels=in_channels,
        hidden_size=cfg["hidden_size"], depth=cfg["depth"], num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_ratio"], ctx_dim=cfg["embed_dim"], attn_drop=cfg["attn_drop"],
    )
    if name == "teacher":
        return DiT(**common)
    if name == "student":
        return MaskedStudentDiT(decoder_depth=cfg["decoder_depth"], **common)
    if name == "embedding":
        return ContrastiveEmbedding(log_dim=log_dim, num_ids=num_ids, embed_dim=cfg["embed_dim"],
                                    in_channels=in_channels)
    return ImplicitDiscriminator(
        token_dim=cfg["hidden_size"], grid_size=input_size // cfg["patch_size"],
        hidden_size=cfg["disc_hidden"], depth=cfg["disc_depth"], num_heads=cfg["disc_heads"],
        mlp_ratio=cfg["mlp_ratio"],
    )


def build_dit(
    size: str,
    *,
    input_size: int = 32,
    in_channels: int = 2,
    patch_size: int | None = None,
    log_dim: int = 128,
    num_ids: int = 1000,
    **overrides,
) -> dict[str, nn.Module]:
    """Build the IKDDiT family for a named size -> dict(teacher, student, embedding, discriminator).

    ``patch_size=None`` takes the size's default. ``overrides`` replace entries of ``DIT_SIZES[size]``
    (depth, hidden_size, num_heads, decoder_depth, embed_dim, mlp_ratio, attn_drop, disc_hidden, disc_depth,
    disc_heads); unknown names raise ValueError. Networks are built in the order of ``NETWORKS``, so a seeded
    call initialises them as before.
    """
    return {name: build_network(name, size, input_size=input_size, in_channels=in_channels,
                                patch_size=patch_size, log_dim=log_dim, num_ids=num_ids, **overrides)
            for name in NETWORKS}
