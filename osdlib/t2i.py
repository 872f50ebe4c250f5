"""Text to image for ReNO (chapter 05): SD-Turbo in one step, and ReNO's four rewards.

The same :func:`osdlib.methods.reno.reno` loop that moves the noise of the book's digit and
CIFAR-10 generators runs here on a latent text-to-image model:

* :class:`OneStepT2I` — G(z, c) = decode((z - sqrt(1 - a) eps(z, T, c)) / sqrt(a)) for an
  epsilon-prediction latent UNet at its last timestep T (a = alpha-bar at T): the x0 estimate
  of one Euler step from pure noise, which is what SD-Turbo's scheduler computes with one
  step (its trailing spacing starts at t = 999 with latents z sqrt(sigma^2 + 1), and the UNet
  sees z). ``c`` is the text encoder's hidden states of the prompt, computed once.
* The rewards ReNO uses, each ``r(x) -> (B,)`` with higher better (ReNO's losses are a
  constant minus these), on the image ReNO's rewards see: resized to the tower's size
  (bicubic, antialiased) and normalised with CLIP's mean and std.

  - :class:`CLIPReward` — s * cos(image features, text features) of a transformers CLIP:
    s = 100 for CLIP (ReNO: laion's CLIP-ViT-H-14, weight 0.01) and the model's own logit
    scale for PickScore (a CLIP-H fine-tuned on human preferences, weight 0.05).
  - :class:`HPSReward` — HPSv2: cos(image, text) of an open_clip ViT-H-14 fine-tuned on human
    preferences (weight 5). Needs ``open_clip_torch`` (in the ``t2i`` extra).
  - :class:`ImageRewardScore` — ImageReward: a BLIP image-text encoder and an MLP head,
    standardised by the model's mean and std (weight 1). Needs the ``image-reward`` package,
    which pins ``timm==0.6.13``: it fits beside ``open_clip_torch`` 2.24 (ReNO's own
    environment) but not beside ``open_clip_torch`` 3 (``timm>=1.0.17``), which is what the
    ``t2i`` extra installs today, so it is not in any extra here.

Every network is frozen; gradients flow only into z. ``load_*`` fetch the real weights
(internet or a Hugging Face cache); :func:`tiny_components` and :func:`tiny_open_clip` build
the same classes with random weights from small configs, so that the whole path runs
anywhere (the tests and the chapter's ``ci``/``book`` runs do that: their pictures are
noise).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Tokenize = Callable[[Sequence[str]], Tensor]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def missing_packages() -> list[str]:
    """The packages this path needs that are not installed (``pip install "osdlib[t2i]"``)."""
    import importlib.util

    return [m for m in ("diffusers", "transformers") if importlib.util.find_spec(m) is None]


def _quiet_imports() -> None:
    from .nets import quiet_import

    quiet_import("diffusers")
    quiet_import("transformers")


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def _checkpointing(module: nn.Module) -> None:
    """Gradient checkpointing of a diffusers model that supports it (UNet, VAE). The rewards
    checkpoint their image tower themselves (:class:`_ImageTextReward`)."""
    if getattr(module, "_supports_gradient_checkpointing", False):
        module.enable_gradient_checkpointing()


class OneStepT2I(nn.Module):
    """A one-step latent text-to-image generator, G(z, c) -> image in [-1, 1]."""

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenize: Tokenize,
        alphas_cumprod: Tensor,
        timestep: int | None = None,
        gradient_checkpointing: bool = True,
    ) -> None:
        super().__init__()
        self.unet, self.vae, self.text_encoder = _frozen(unet), _frozen(vae), _frozen(text_encoder)
        self.tokenize = tokenize
        self.timestep = len(alphas_cumprod) - 1 if timestep is None else timestep
        self.register_buffer("alpha", alphas_cumprod[self.timestep].float().clone())
        self.scaling_factor = float(getattr(getattr(vae, "config", None), "scaling_factor", 1.0))
        if gradient_checkpointing:
            _checkpointing(self.unet)
            _checkpointing(self.vae)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        """The text condition c of each prompt (the encoder's last hidden states)."""
        ids = self.tokenize(list(prompts)).to(self.alpha.device)
        return self.text_encoder(input_ids=ids).last_hidden_state

    def forward(self, z: Tensor, c: Tensor) -> Tensor:
        dtype = next(self.unet.parameters()).dtype
        t = torch.full((len(z),), self.timestep, device=z.device)
        eps = self.unet(z.to(dtype), t, encoder_hidden_states=c.to(dtype)).sample
        x0 = (z - (1 - self.alpha).sqrt() * eps.to(z.dtype)) / self.alpha.sqrt()
        image = self.vae.decode((x0 / self.scaling_factor).to(dtype)).sample
        return image.float().clamp(-1, 1)


class _ImageTextReward:
    """What ReNO's rewards share: images in [-1, 1] go to [0, 1], are resized to the tower's
    ``size`` (bicubic, antialiased: torchvision's ``Resize`` on a square image, which ReNO
    applies before every reward) and normalised with CLIP's mean and std, differentiably.
    With ``checkpoint`` the image tower keeps no activations for the backward pass and runs
    again there instead (torch.utils.checkpoint). ReNO asks for gradient checkpointing too,
    but only its HPSv2 (open_clip) really gets it: transformers' switch, which it uses for
    CLIP and PickScore, acts only in training mode, and the frozen rewards are in eval mode."""

    def _setup(self, size: int, device: torch.device, checkpoint: bool) -> None:
        self.size, self.checkpoint = size, checkpoint
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)

    def pixels(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        x = (x.float().clamp(-1, 1) + 1) / 2
        x = F.interpolate(
            x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True
        )
        return ((x - self.mean) / self.std).to(dtype)

    def tower(self, fn: Callable[[Tensor], Tensor], pixels: Tensor) -> Tensor:
        if self.checkpoint and torch.is_grad_enabled() and pixels.requires_grad:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(fn, pixels, use_reentrant=False)
        return fn(pixels)


class CLIPReward(_ImageTextReward):
    """r(x) = scale * cos(CLIP image features of x, text features of the prompts), for a
    transformers ``CLIPModel``. ``prompts`` has one prompt per sample (or one for all).
    ``scale=None`` uses the model's own logit scale (PickScore's score)."""

    def __init__(
        self,
        model: nn.Module,
        tokenize: Tokenize,
        prompts: Sequence[str],
        scale: float | None = 100.0,
        name: str = "CLIP",
        checkpoint: bool = True,
    ) -> None:
        self.model, self.name = _frozen(model), name
        device = next(model.parameters()).device
        with torch.no_grad():
            text = _features(model.get_text_features(input_ids=tokenize(list(prompts)).to(device)))
        self.text = F.normalize(text.float(), dim=-1)
        self.scale = float(model.logit_scale.exp()) if scale is None else scale
        self._setup(model.config.vision_config.image_size, device, checkpoint)

    def __call__(self, x: Tensor, y=None) -> Tensor:
        pixels = self.pixels(x, next(self.model.parameters()).dtype)

        def features(p: Tensor) -> Tensor:
            return _features(self.model.get_image_features(pixel_values=p))

        image = F.normalize(self.tower(features, pixels).float(), dim=-1)
        return self.scale * (image * self.text).sum(-1)


class HPSReward(_ImageTextReward):
    """HPSv2: r(x) = cos(image features of x, text features of the prompts) of an open_clip
    model (``encode_image`` / ``encode_text``); ReNO minimises 1 - r with weight 5."""

    def __init__(
        self,
        model: nn.Module,
        tokenize: Tokenize,
        prompts: Sequence[str],
        name: str = "HPSv2",
        checkpoint: bool = True,
    ) -> None:
        self.model, self.name = _frozen(model), name
        device = next(model.parameters()).device
        with torch.no_grad():
            text = model.encode_text(tokenize(list(prompts)).to(device))
        self.text = F.normalize(text.float(), dim=-1)
        size = model.visual.image_size
        self._setup(size[0] if isinstance(size, tuple | list) else size, device, checkpoint)

    def __call__(self, x: Tensor, y=None) -> Tensor:
        pixels = self.pixels(x, next(self.model.parameters()).dtype)
        image = F.normalize(self.tower(self.model.encode_image, pixels).float(), dim=-1)
        return (image * self.text).sum(-1)


class ImageRewardScore(_ImageTextReward):
    """ImageReward: the BLIP text encoder reads the prompt with cross-attention to the BLIP
    vision encoder's tokens of x; an MLP head on its first token gives the score,
    standardised by the model's ``mean`` and ``std``. ``model`` is what the ``image-reward``
    package's ``load`` returns (its ``blip.tokenizer``, ``blip.visual_encoder``,
    ``blip.text_encoder``, ``mlp``, ``mean``, ``std``); prompts are cut at 35 tokens, as
    there. ReNO minimises 2 - r with weight 1."""

    def __init__(
        self,
        model: nn.Module,
        prompts: Sequence[str],
        name: str = "ImageReward",
        size: int = 224,
        max_length: int = 35,
        checkpoint: bool = True,
    ) -> None:
        self.model, self.name = _frozen(model), name
        device = next(model.parameters()).device
        tokens = model.blip.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        self.ids = tokens.input_ids.to(device)
        self.mask = tokens.attention_mask.to(device)
        self._setup(size, device, checkpoint)

    def __call__(self, x: Tensor, y=None) -> Tensor:
        m = self.model
        dtype = next(m.parameters()).dtype
        image = self.tower(m.blip.visual_encoder, self.pixels(x, dtype))
        ids, mask = self.ids, self.mask
        if len(ids) == 1 and len(x) > 1:  # one prompt for every image
            ids, mask = ids.expand(len(x), -1), mask.expand(len(x), -1)
        text = m.blip.text_encoder(
            ids,
            attention_mask=mask,
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(
                image.shape[:-1], dtype=torch.long, device=ids.device
            ),
            return_dict=True,
        )
        score = m.mlp(text.last_hidden_state[:, 0, :].to(dtype)).squeeze(-1).float()
        return (score - float(m.mean)) / float(m.std)


def _features(out) -> Tensor:
    """transformers < 5 returns the projected features, >= 5 an output with pooler_output."""
    return out if isinstance(out, Tensor) else out.pooler_output


# --------------------------------------------------------------------------------------
# The real models (internet or a Hugging Face cache needed)
# --------------------------------------------------------------------------------------


class WeightsUnavailable(RuntimeError):
    """The model could not be loaded (no internet and not in the Hugging Face cache)."""


def _load(what: str, fn, install: str = 'pip install "osdlib[t2i]"'):
    """``fn(local_only)``, with a clear :class:`WeightsUnavailable` when it cannot load.
    Without a connection to the Hub, ``local_only`` is true and every ``from_pretrained``
    looks only in the local cache (``local_files_only``: no retries, no waiting)."""
    from .data import online

    try:
        return fn(not online("huggingface.co"))
    except ImportError as err:
        raise WeightsUnavailable(
            f"{what} needs a package that is missing: {install} ({err})"
        ) from err
    except (OSError, ValueError) as err:
        raise WeightsUnavailable(
            f"could not load {what}: no internet and not in the Hugging Face cache? ({err})"
        ) from err


def clip_tokenizer(model_id: str, subfolder: str = "", local_only: bool = False) -> Tokenize:
    """CLIP's BPE tokenizer of ``model_id`` (padded to its 77 tokens)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(model_id, subfolder=subfolder, local_files_only=local_only)

    def tokenize(prompts: Sequence[str]) -> Tensor:
        return tok(
            list(prompts),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    return tokenize


def load_sd_turbo(
    model_id: str = "stabilityai/sd-turbo",
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.float16,
) -> OneStepT2I:
    """SD-Turbo (512x512, 4x64x64 latents) as a one-step generator."""

    def load(local_only: bool):
        _quiet_imports()
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        kw = {"torch_dtype": dtype, "local_files_only": local_only}
        unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", **kw)
        text = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder", **kw)
        sched = DDPMScheduler.from_pretrained(
            model_id, subfolder="scheduler", local_files_only=local_only
        )
        tokenize = clip_tokenizer(model_id, subfolder="tokenizer", local_only=local_only)
        return OneStepT2I(unet, vae, text, tokenize, sched.alphas_cumprod).to(device)

    return _load(model_id, load)


def load_clip_reward(
    prompts: Sequence[str],
    model_id: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.float16,
) -> CLIPReward:
    """CLIP score (100 x cosine) of each image with its prompt, with ReNO's CLIP (laion's
    ViT-H-14; its logit scale is 100 too)."""
    return _clip_reward(prompts, model_id, model_id, 100.0, "CLIP", device, dtype)


def load_pickscore(
    prompts: Sequence[str],
    model_id: str = "yuvalkirstain/PickScore_v1",
    processor_id: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.float16,
) -> CLIPReward:
    """PickScore: the preference-tuned CLIP-H's logit-scaled cosine of image and prompt."""
    return _clip_reward(prompts, model_id, processor_id, None, "PickScore", device, dtype)


def _clip_reward(prompts, model_id, tokenizer_id, scale, name, device, dtype) -> CLIPReward:
    def load(local_only: bool):
        _quiet_imports()
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(
            model_id, torch_dtype=dtype, local_files_only=local_only
        ).to(device)
        tokenize = clip_tokenizer(tokenizer_id, local_only=local_only)
        return CLIPReward(model, tokenize, prompts, scale=scale, name=name)

    return _load(model_id, load)


def load_hpsv2(
    prompts: Sequence[str],
    repo_id: str = "xswu/HPSv2",
    filename: str = "HPS_v2.1_compressed.pt",
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.float16,
) -> HPSReward:
    """HPSv2.1: open_clip's ViT-H-14 architecture with every weight from the HPSv2 checkpoint
    (so nothing else is downloaded), and open_clip's tokenizer for it."""

    def load(local_only: bool):
        import open_clip
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id, filename, local_files_only=local_only)
        model = open_clip.create_model("ViT-H-14", pretrained=None)
        try:  # tensors only: a checkpoint is never allowed to run code here
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise WeightsUnavailable(
                f"{path} holds more than tensors, which this loader does not unpickle; "
                "if you trust it, load it with torch.load(..., weights_only=False) and build "
                f"t2i.HPSReward yourself ({err})"
            ) from err
        model.load_state_dict(state.get("state_dict", state))
        model = model.to(device=device, dtype=dtype)
        tokenizer = open_clip.get_tokenizer("ViT-H-14")
        return HPSReward(model, lambda p: tokenizer(list(p)), prompts)

    return _load(f"{repo_id}/{filename}", load, 'pip install "osdlib[t2i]" (open_clip_torch)')


def load_image_reward(
    prompts: Sequence[str],
    name: str = "ImageReward-v1.0",
    download_root: str | Path | None = None,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.float16,
) -> ImageRewardScore:
    """ImageReward through its own package (``pip install image-reward``; see the module's
    note on ``timm``). The package downloads ``ImageReward.pt`` and ``med_config.json`` to
    ``download_root`` (its default ``~/.cache/ImageReward``) itself; without a connection to
    the Hub only files already there are used, and their absence is said at once."""

    def load(local_only: bool):
        import ImageReward

        root = Path(download_root or Path.home() / ".cache" / "ImageReward")
        checkpoint, config = root / "ImageReward.pt", root / "med_config.json"
        if local_only:
            if not (checkpoint.exists() and config.exists()):
                raise OSError(f"ImageReward's files are not in {root}")
            model = ImageReward.load(str(checkpoint), device=device, med_config=str(config))
        else:
            model = ImageReward.load(name, device=device, download_root=str(root))
        return ImageRewardScore(model.to(device=device, dtype=dtype), prompts)

    return _load(
        name,
        load,
        "pip install image-reward (beside open_clip_torch 2.24, or in an environment of its own)",
    )


# --------------------------------------------------------------------------------------
# Tiny random components: the same code path with no download
# --------------------------------------------------------------------------------------


def toy_tokenizer(vocab: int = 1000, length: int = 16) -> Tokenize:
    """Words to ids by a fixed hash (bos 0, eos 1, padding 1): a stand-in for CLIP's BPE."""
    import zlib

    def tokenize(prompts: Sequence[str]) -> Tensor:
        rows = []
        for p in prompts:
            ids = [0] + [2 + zlib.crc32(w.encode()) % (vocab - 2) for w in p.lower().split()]
            ids = (ids[: length - 1] + [1]) + [1] * max(0, length - len(ids) - 1)
            rows.append(ids[:length])
        return torch.tensor(rows)

    return tokenize


def tiny_components(seed: int = 0, device: str | torch.device = "cpu"):
    """(generator, clip_model, tokenize): a random 2-block UNet on 4x8x8 latents, a random
    VAE decoding to 3x16x16, random CLIP text/vision towers (32-d). For tests and dry runs."""
    _quiet_imports()
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    text = dict(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8,
            sample_size=16,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(**text))
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    # SD's schedule: scaled-linear betas 0.00085 ... 0.012 over 1000 steps
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    tokenize = toy_tokenizer(text["vocab_size"], text["max_position_embeddings"])
    G = OneStepT2I(unet, vae, text_encoder, tokenize, sched.alphas_cumprod).to(device)
    return G, _frozen(clip.to(device)), tokenize


def tiny_open_clip(seed: int = 0, device: str | torch.device = "cpu"):
    """(model, tokenize): a random open_clip CLIP (32-d towers, 32x32 images, the toy
    tokenizer's 16 tokens), the stand-in for HPSv2's ViT-H-14. Needs ``open_clip_torch``."""
    from open_clip.model import CLIP

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIP(
            embed_dim=32,
            vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
            text_cfg=dict(context_length=16, vocab_size=1000, width=32, heads=4, layers=2),
        )
    return _frozen(model.to(device)), toy_tokenizer(1000, 16)
