"""Autoregressive image models for chapter 06: a VQ tokenizer and a causal transformer.

* :class:`VQTokenizer` — a small VQ autoencoder: a conv encoder to an h x w grid of
  D-dimensional vectors, each replaced by its nearest of K codebook vectors (straight-through
  gradient to the encoder), a conv decoder back to pixels. Loss: reconstruction MSE +
  codebook term ||sg(z) - c||^2 + beta * commitment ||z - sg(c)||^2 (beta = 0.25, VQ-VAE).
  Codes unused for a while are restarted on random encoder outputs (dead-code restarts).
* :class:`ARTransformer` — a class-conditional causal transformer over the token grid in
  raster order: position 0 holds the class embedding, position i the embedding of token i;
  the output at position i predicts token i + 1. Sampling runs one position at a time with
  a key/value cache (:meth:`ARTransformer.generate`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------


class VQTokenizer(nn.Module):
    """A VQ autoencoder for (C, H, W) images in [-1, 1] with ``downsample`` in {1, 2, 4}."""

    def __init__(
        self,
        channels: int = 1,
        codes: int = 64,
        code_dim: int = 4,
        hidden: int = 64,
        downsample: int = 2,
        beta: float = 0.25,
        restart_after: int = 200,
    ) -> None:
        super().__init__()
        if downsample not in (1, 2, 4):
            raise ValueError(f"downsample must be 1, 2 or 4, got {downsample}")
        down = [nn.Conv2d(channels, hidden, 3, padding=1), nn.SiLU()]
        up = []
        for _ in range({1: 0, 2: 1, 4: 2}[downsample]):
            down += [nn.Conv2d(hidden, hidden, 4, stride=2, padding=1), nn.SiLU()]
            up += [nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.SiLU()]
        self.encoder = nn.Sequential(
            *down,
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, code_dim, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(code_dim, hidden, 3, padding=1),
            nn.SiLU(),
            *up,
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, channels, 3, padding=1),
        )
        self.codebook = nn.Parameter(torch.randn(codes, code_dim) * 0.1)
        self.beta, self.restart_after = beta, restart_after
        self.register_buffer("idle", torch.zeros(codes, dtype=torch.long))  # steps since used

    @property
    def codes(self) -> int:
        return self.codebook.shape[0]

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Nearest codes of z (B, D, h, w): (indices (B, h, w), code vectors (B, D, h, w))."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        dist = torch.cdist(flat.float(), self.codebook.float())
        index = dist.argmin(1)
        q = self.codebook[index].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        return index.view(z.shape[0], z.shape[2], z.shape[3]), q

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Token grid (B, h, w) of images x."""
        return self.quantize(self.encoder(x))[0]

    def decode(self, index: Tensor) -> Tensor:
        """Images from a token grid (B, h, w) or flat tokens (B, h * w) with a square grid."""
        if index.dim() == 2:
            side = int(round(index.shape[1] ** 0.5))
            index = index.view(-1, side, side)
        q = self.codebook[index].permute(0, 3, 1, 2)
        return self.decoder(q)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(reconstruction, indices, losses); in training mode also counts code usage and
        restarts codes idle for ``restart_after`` steps on random encoder outputs."""
        z = self.encoder(x)
        index, q = self.quantize(z)
        losses = {
            "recon": F.mse_loss(self.decoder(z + (q - z).detach()), x),  # straight-through
            "codebook": F.mse_loss(q, z.detach()),
            "commit": F.mse_loss(z, q.detach()),
        }
        losses["total"] = losses["recon"] + losses["codebook"] + self.beta * losses["commit"]
        if self.training:
            self._restart_dead(index, z)
        recon = self.decoder(q)
        return recon, index, losses

    @torch.no_grad()
    def _restart_dead(self, index: Tensor, z: Tensor) -> None:
        import torch.distributed as dist

        used = torch.zeros_like(self.idle)
        used[index.flatten()] = 1
        ranks = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if ranks:  # under torchrun a code is used if any rank used it: the same counters
            dist.all_reduce(used, op=dist.ReduceOp.MAX)
        self.idle = torch.where(used > 0, torch.zeros_like(self.idle), self.idle + 1)
        dead = torch.nonzero(self.idle >= self.restart_after).flatten()
        if len(dead):
            flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
            pick = torch.randint(len(flat), (len(dead),), device=flat.device)
            self.codebook.data[dead] = flat[pick].to(self.codebook.dtype)
            if ranks:  # rank 0's restarted codes for every rank
                dist.broadcast(self.codebook.data, src=0)
            self.idle[dead] = 0

    @torch.no_grad()
    def usage(self, x: Tensor) -> float:
        """Fraction of the codebook used on images x."""
        return float(torch.unique(self.encode(x)).numel() / self.codes)


# --------------------------------------------------------------------------------------
# The causal transformer
# --------------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cache: dict | None = None) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        past = 0
        if cache is not None:
            if "k" in cache:
                past = cache["k"].shape[2]
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        # query i (absolute position past + i) sees keys 0 .. past + i
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif t == 1:  # one new position sees everything before it
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, cache: dict | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class ARTransformer(nn.Module):
    """Class-conditional causal transformer over ``length`` tokens from a ``vocab``."""

    def __init__(
        self,
        vocab: int,
        length: int,
        num_classes: int,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.vocab, self.length = vocab, length
        self.tok = nn.Embedding(vocab, dim)
        self.cls = nn.Embedding(num_classes, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def inputs(self, tokens: Tensor, y: Tensor) -> Tensor:
        """Input embeddings [class, tok_1, ..., tok_n] (B, n + 1, dim), without positions."""
        return torch.cat([self.cls(y)[:, None], self.tok(tokens)], dim=1)

    def run(self, h: Tensor, start: int = 0, caches: list[dict] | None = None) -> Tensor:
        """Logits for input embeddings ``h`` at positions start ... start + T - 1."""
        h = h + self.pos[start : start + h.shape[1]]
        for i, block in enumerate(self.blocks):
            h = block(h, None if caches is None else caches[i])
        return self.head(self.ln(h))

    def forward(self, tokens: Tensor, y: Tensor) -> Tensor:
        """Teacher forcing: logits (B, L, vocab) for tokens 1..L given tokens (B, L)."""
        return self.run(self.inputs(tokens[:, : self.length - 1], y))

    def loss(self, tokens: Tensor, y: Tensor) -> Tensor:
        """Next-token cross-entropy on a batch of token sequences (B, L)."""
        logits = self(tokens, y)
        return F.cross_entropy(logits.reshape(-1, self.vocab), tokens.reshape(-1))

    @torch.no_grad()
    def generate(
        self,
        y: Tensor,
        choose: Callable[[Tensor, int], Tensor] | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Tokens (B, L), one position at a time. ``choose(logits, i)`` picks token i from the
        logits (B, vocab) of position i (default: sample after temperature and top-k)."""
        from .methods.distilled_decoding import process_logits

        if choose is None:

            def choose(logits: Tensor, i: int) -> Tensor:
                p = process_logits(logits, temperature, top_k).exp()
                if generator is not None and generator.device.type != p.device.type:
                    # a CPU generator with a GPU model: drawn on the CPU, one copy per
                    # position (pass a generator on the model's device for timings)
                    return (
                        torch.multinomial(p.cpu(), 1, generator=generator).squeeze(1).to(p.device)
                    )
                return torch.multinomial(p, 1, generator=generator).squeeze(1)

        caches = [{} for _ in self.blocks] if use_cache else None
        tokens = torch.zeros(len(y), 0, dtype=torch.long, device=y.device)
        h = self.cls(y)[:, None]
        for i in range(self.length):
            if use_cache:
                logits = self.run(h, start=i, caches=caches)[:, -1]
            else:
                logits = self.run(self.inputs(tokens, y))[:, -1]
            nxt = choose(logits, i)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            h = self.tok(nxt)[:, None]
        return tokens


# --------------------------------------------------------------------------------------
# Training wrappers
# --------------------------------------------------------------------------------------


def train_tokenizer(tok: VQTokenizer, data, steps: int, batch: int = 128, **kwargs):
    """Train a :class:`VQTokenizer` on an :class:`osdlib.data.ImageData` (no EMA: the
    codebook restarts would be averaged away)."""
    from .train import train

    kwargs.setdefault("ema_decay", 0.0)
    return train(
        tok,
        lambda m, b, g: m(b[0])[2]["total"],
        lambda g: data.batch(batch, generator=g),
        steps,
        desc=kwargs.pop("desc", "VQ tokenizer"),
        **kwargs,
    )


def train_ar(
    ar: ARTransformer, tokens: Tensor, labels: Tensor, steps: int, batch: int = 256, **kwargs
):
    """Next-token training of ``ar`` on token sequences (N, L) with class labels (N,)."""
    from .train import train

    def batch_fn(g):
        i = torch.randint(0, len(tokens), (batch,), generator=g)
        return tokens[i], labels[i]

    return train(
        ar,
        lambda m, b, g: m.loss(b[0], b[1]),
        batch_fn,
        steps,
        desc=kwargs.pop("desc", "AR transformer"),
        **kwargs,
    )
