"""Generators for replay methods, in one place: WGAN-GP (Gulrajani et al., NeurIPS 2017), optionally
class-conditional with an auxiliary classifier (AC-GAN, Odena et al. 2017) as MeRGAN uses it, and a VAE
(Kingma & Welling 2014) as van de Ven et al.'s generative replay uses it.

Both map between the data space (the stream's standardised inputs) and their own output range through
:class:`DataRange`: the per-channel minimum and maximum of the first task's training inputs (what a
generator can know before the stream starts), so a ``tanh`` output in ``[-1, 1]`` or a ``sigmoid`` output
in ``[0, 1]`` covers exactly the range the data take.

Networks (``ConvGenerator`` / ``ConvCritic``) follow MeRGAN's ``network/gan32_model.py`` (itself the
WGAN-GP code's): a linear layer from the noise to ``4*dim`` channels at 4x4, transposed 5x5 convolutions
with stride 2 halving the channels, batch norm (class-conditional: a scale and an offset per class,
Dumoulin et al. 2016, ``tflib/ops/cond_batchnorm.py``) with the *batch's* statistics also when sampling
(the code keeps no running statistics), ReLU, a ``tanh`` output; the critic is 5x5 convolutions with
stride 2 and LeakyReLU(0.2), no normalisation, a linear critic output and a linear AC-GAN head. Sizes
other than the code's 32x32: the generator upsamples to the first power-of-two multiple of 4 that covers
the image and crops the centre (28x28 Fashion-MNIST: 32 -> 28; 8x8 digits: 4 -> 8); flat (non-image)
inputs get the same layers as an MLP. ``groups``: batch-norm statistics per consecutive group of equal
size, so one call generates several per-class batches exactly as separate calls would (the code generates
each old class in its own call).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from metagate.schema import Section


# Each generator kind's defaults, from its paper's code; a field the user sets explicitly wins (GeneratorConfig fills
# only the fields left unset, so ``generator.kind=vae`` alone gives van de Ven et al.'s VAE, not a VAE with the
# WGAN's optimiser).
KIND_DEFAULTS: dict[str, dict[str, object]] = {
    # WGAN-GP (Gulrajani et al. 2017, gan_mnist.py / gan_cifar.py: Adam 1e-4, betas (0, 0.9), lambda 10,
    # CRITIC_ITERS 5; MeRGAN's code: DIM 32, z 128)
    "wgan_gp": {"z_dim": 128, "dim": 32, "gp_lambda": 10.0, "critic_iters": 5, "lr": 1e-4, "beta1": 0.0, "beta2": 0.9},
    # van de Ven et al.'s VAE (GMvandeVen/continual-learning and brain-inspired-replay, options.py: fc_lay 3 with
    # fc_units 400 -> encoder 400-400, z_dim 100, lr_gen = lr = 0.001 on split MNIST, Adam betas (0.9, 0.999))
    "vae": {"z_dim": 100, "vae_hidden": [400, 400], "lr": 1e-3, "beta1": 0.9, "beta2": 0.999},
}


class GeneratorConfig(Section):
    """The replay generator's settings (``dgr``'s ``generator``; ``mergan`` uses the WGAN-GP fields). Fields left
    unset take the defaults of the chosen ``kind`` (``KIND_DEFAULTS``); the resolved config records them."""

    kind: Literal["wgan_gp", "vae"] = Field("wgan_gp", description="wgan_gp (Shin et al.'s DGR, MeRGAN) or vae (van de Ven et al.'s replay: cheaper)")
    z_dim: int = Field(128, ge=1, description="noise / latent size (default by kind: wgan_gp 128, MeRGAN code; vae 100, van de Ven's code)")
    dim: int = Field(32, ge=1, description="WGAN-GP width: generator channels 4*dim, 2*dim, dim; critic dim, 2*dim, 4*dim (MeRGAN code: DIM_G = DIM_D = 32)")
    gp_lambda: float = Field(10.0, ge=0, description="gradient penalty weight (WGAN-GP and MeRGAN code: 10)")
    critic_iters: int = Field(5, ge=1, description="critic updates per generator update (code: CRITIC_ITERS = 5)")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate (default by kind: wgan_gp 1e-4, WGAN-GP code; vae 1e-3, van de Ven's code)")
    beta1: float = Field(0.0, ge=0, lt=1, description="Adam beta1 (default by kind: wgan_gp 0; vae 0.9)")
    beta2: float = Field(0.9, ge=0, lt=1, description="Adam beta2 (default by kind: wgan_gp 0.9; vae 0.999)")
    vae_hidden: list[int] = Field(default_factory=lambda: [400, 400], description="VAE encoder widths, decoder mirrored (van de Ven et al.: fc 400-400)")

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data: Any) -> Any:
        """Fill the fields the user left unset with the defaults of the chosen kind (explicit values win)."""
        if not isinstance(data, dict):
            return data
        kind = data.get("kind", "wgan_gp")
        defaults = KIND_DEFAULTS.get(kind, {}) if isinstance(kind, str) else {}
        return {**{k: (list(v) if isinstance(v, list) else v) for k, v in defaults.items() if k in cls.model_fields}, **data}


class ReplayGeneratorConfig(GeneratorConfig):
    """A replay generator with a training budget of its own (``dgr``'s ``generator``)."""

    iterations_per_task: int | None = Field(
        None,
        ge=1,
        description="generator iterations per task, spread evenly over the solver's steps (null: as many as the solver's, "
        "van de Ven's g_iters = iters; a WGAN-GP iteration is critic_iters critic updates and one generator update, "
        "as the WGAN-GP code's ITERS)",
    )


class DataRange(nn.Module):
    """Per-channel ``[lo, hi]`` of the data: maps a generator's ``[-1, 1]`` or ``[0, 1]`` output to data space and back."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        dims = [0, *range(2, x.ndim)] if x.ndim > 2 else [0]
        shape = [1, x.shape[1], *([1] * (x.ndim - 2))] if x.ndim > 2 else [1, x.shape[1]]
        self.register_buffer("lo", x.amin(dim=dims).reshape(shape).clone())
        self.register_buffer("hi", x.amax(dim=dims).reshape(shape).clone().maximum(self.lo + 1e-6))

    def from_unit(self, u: Tensor) -> Tensor:
        return self.lo + (self.hi - self.lo) * u

    def to_unit(self, x: Tensor) -> Tensor:
        return ((x - self.lo) / (self.hi - self.lo)).clamp(0, 1)

    def from_tanh(self, g: Tensor) -> Tensor:
        return self.from_unit((g + 1) / 2)


class CondBatchNorm(nn.Module):
    """Batch norm with the batch's statistics (per group of ``groups`` equal consecutive parts) and a learned
    scale and offset per class (``num_classes = 0``: one for all, plain batch norm without running stats)."""

    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(max(num_classes, 1), features))
        self.offset = nn.Parameter(torch.zeros(max(num_classes, 1), features))
        self.conditional = num_classes > 0

    def forward(self, h: Tensor, labels: Tensor | None, groups: int = 1) -> Tensor:
        g = h.reshape(groups, h.shape[0] // groups, *h.shape[1:])
        dims = [1] + list(range(3, g.ndim))
        mean = g.mean(dim=dims, keepdim=True)
        var = g.var(dim=dims, keepdim=True, unbiased=False)
        h = ((g - mean) / torch.sqrt(var + 1e-5)).reshape(h.shape)
        idx = labels if (self.conditional and labels is not None) else torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
        view = [h.shape[0], h.shape[1]] + [1] * (h.ndim - 2)
        return h * self.scale[idx].reshape(view) + self.offset[idx].reshape(view)


def _up_layers(size: int) -> int:
    """Stride-2 upsamplings from 4 to the first power-of-two multiple of 4 covering ``size``."""
    return max(0, math.ceil(math.log2(max(size, 4) / 4)))


class ConvGenerator(nn.Module):
    """Noise (and a class) to an image in ``[-1, 1]`` (MeRGAN's ``Generator``, see the module docstring)."""

    def __init__(self, z_dim: int, shape: tuple[int, ...], dim: int, num_classes: int) -> None:
        super().__init__()
        self.z_dim, self.shape = z_dim, shape
        c, h, w = shape
        self.ups = max(1, _up_layers(max(h, w)))
        chans = [dim * 2 ** (self.ups - 1 - i) for i in range(self.ups)] + [c]  # 32x32: 4d, 2d, d, c
        self.start = chans[0]
        self.input = nn.Linear(z_dim, 4 * 4 * self.start)
        self.norms = nn.ModuleList(CondBatchNorm(a, num_classes) for a in chans[:-1])
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(a, b, 5, stride=2, padding=2, output_padding=1) for a, b in zip(chans[:-1], chans[1:])
        )

    def forward(self, z: Tensor, labels: Tensor | None = None, groups: int = 1) -> Tensor:
        h = self.input(z).reshape(z.shape[0], self.start, 4, 4)
        h = torch.relu(self.norms[0](h, labels, groups))
        for i, deconv in enumerate(self.deconvs):
            h = deconv(h)
            if i + 1 < len(self.norms):
                h = torch.relu(self.norms[i + 1](h, labels, groups))
        c, H, W = self.shape
        top, left = (h.shape[2] - H) // 2, (h.shape[3] - W) // 2
        return torch.tanh(h[:, :, top : top + H, left : left + W])


class ConvCritic(nn.Module):
    """Image to a critic value ``[B]`` and (``num_classes > 0``) AC-GAN logits (MeRGAN's ``Discriminator``)."""

    def __init__(self, shape: tuple[int, ...], dim: int, num_classes: int) -> None:
        super().__init__()
        c, h, w = shape
        downs = max(1, _up_layers(max(h, w)))
        chans = [c] + [dim * 2**i for i in range(downs)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 5, stride=2, padding=2) for a, b in zip(chans[:-1], chans[1:]))
        for _ in range(downs):
            h, w = (h + 1) // 2, (w + 1) // 2
        feat = chans[-1] * h * w
        self.output = nn.Linear(feat, 1)
        self.acgan = nn.Linear(feat, num_classes) if num_classes > 0 else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        h = x
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
        h = h.flatten(1)
        return self.output(h).squeeze(1), None if self.acgan is None else self.acgan(h)


class MLPGenerator(nn.Module):
    """The same generator for flat inputs: linear layers with (conditional) batch norm and ReLU, ``tanh`` out."""

    def __init__(self, z_dim: int, shape: tuple[int, ...], dim: int, num_classes: int) -> None:
        super().__init__()
        self.z_dim, self.shape = z_dim, shape
        out = math.prod(shape)
        widths = [z_dim, 4 * dim, 4 * dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(CondBatchNorm(b, num_classes) for b in widths[1:])
        self.out = nn.Linear(widths[-1], out)

    def forward(self, z: Tensor, labels: Tensor | None = None, groups: int = 1) -> Tensor:
        h = z
        for layer, norm in zip(self.layers, self.norms):
            h = torch.relu(norm(layer(h), labels, groups))
        return torch.tanh(self.out(h)).reshape(z.shape[0], *self.shape)


class MLPCritic(nn.Module):
    def __init__(self, shape: tuple[int, ...], dim: int, num_classes: int) -> None:
        super().__init__()
        widths = [math.prod(shape), 4 * dim, 4 * dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.output = nn.Linear(widths[-1], 1)
        self.acgan = nn.Linear(widths[-1], num_classes) if num_classes > 0 else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        h = x.flatten(1)
        for layer in self.layers:
            h = F.leaky_relu(layer(h), 0.2)
        return self.output(h).squeeze(1), None if self.acgan is None else self.acgan(h)


def is_image(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and min(shape[1], shape[2]) >= 4


def adam(params: object, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """Adam, with the fused kernel where torch has it (the same update; the per-tensor path costs a replay step
    about a fifth of its time on one CPU thread)."""
    params = [p for p in params if p.requires_grad]  # type: ignore[attr-defined]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused or None)
    except RuntimeError:  # torch < 2.4 has no fused Adam on CPU
        return torch.optim.Adam(params, lr=lr, betas=betas)


class WGANGP(nn.Module):
    """A WGAN-GP: generator, critic (with an AC-GAN head when ``num_classes > 0``), one Adam each, and the
    data range. ``generate`` gives data-space samples; ``raw`` the ``[-1, 1]`` output (replay alignment's space)."""

    def __init__(self, cfg: GeneratorConfig, shape: tuple[int, ...], first_x: Tensor, num_classes: int = 0) -> None:
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        image = is_image(shape)
        self.generator = (ConvGenerator if image else MLPGenerator)(cfg.z_dim, shape, cfg.dim, num_classes)
        self.critic = (ConvCritic if image else MLPCritic)(shape, cfg.dim, num_classes)
        self.range = DataRange(first_x)
        self.reset_optimizers()

    def reset_optimizers(self) -> None:
        betas = (self.cfg.beta1, self.cfg.beta2)
        self.g_opt = adam(self.generator.parameters(), self.cfg.lr, betas)
        self.c_opt = adam(self.critic.parameters(), self.cfg.lr, betas)

    def noise(self, n: int, device: torch.device) -> Tensor:
        return torch.randn(n, self.cfg.z_dim, device=device)

    def raw(self, z: Tensor, labels: Tensor | None = None, groups: int = 1) -> Tensor:
        return self.generator(z, labels, groups)

    def to_data(self, raw: Tensor) -> Tensor:
        return self.range.from_tanh(raw)

    def generate(self, n: int, labels: Tensor | None = None, groups: int = 1) -> Tensor:
        return self.to_data(self.raw(self.noise(n, self.range.lo.device), labels, groups))

    def gradient_penalty(self, real: Tensor, fake: Tensor) -> Tensor:
        """``mean((||grad_x D(x_hat)|| - 1)^2)`` at random interpolates of real and fake (WGAN-GP, eq. 3)."""
        alpha = torch.rand(real.shape[0], *([1] * (real.ndim - 1)), device=real.device)
        x_hat = (real + alpha * (fake - real)).requires_grad_(True)
        grad = torch.autograd.grad(self.critic(x_hat)[0].sum(), x_hat, create_graph=True)[0]
        return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()

    def critic_loss(self, real: Tensor, fake: Tensor, labels: Tensor | None = None) -> Tensor:
        """``mean D(fake) - mean D(real) + lambda * GP`` (+ AC-GAN cross-entropy on the real images, as MeRGAN's code)."""
        d_real, ac_real = self.critic(real)
        d_fake, _ = self.critic(fake.detach())
        loss = d_fake.mean() - d_real.mean() + self.cfg.gp_lambda * self.gradient_penalty(real, fake.detach())
        if ac_real is not None and labels is not None:
            loss = loss + F.cross_entropy(ac_real, labels)
        return loss

    def generator_loss(self, fake: Tensor, labels: Tensor | None = None) -> Tensor:
        """``-mean D(fake)`` (+ AC-GAN cross-entropy of the fake images' classes)."""
        d_fake, ac_fake = self.critic(fake)
        loss = -d_fake.mean()
        if ac_fake is not None and labels is not None:
            loss = loss + F.cross_entropy(ac_fake, labels)
        return loss


class VAE(nn.Module):
    """A fully connected VAE (van de Ven et al.'s generative replay: encoder 400-400, latent 100, decoder
    mirrored, Bernoulli likelihood on pixels in ``[0, 1]``). Loss: the negative ELBO per input value
    (binary cross-entropy summed over values plus the Gaussian KL, divided by the number of values), averaged
    over the batch. One Adam (``lr``, betas ``(beta1, beta2)``)."""

    def __init__(self, cfg: GeneratorConfig, shape: tuple[int, ...], first_x: Tensor) -> None:
        super().__init__()
        self.cfg, self.shape = cfg, shape
        d = math.prod(shape)
        enc = [d, *cfg.vae_hidden]
        self.encoder = nn.Sequential(*[m for a, b in zip(enc[:-1], enc[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.mu = nn.Linear(enc[-1], cfg.z_dim)
        self.logvar = nn.Linear(enc[-1], cfg.z_dim)
        dec = [cfg.z_dim, *reversed(cfg.vae_hidden)]
        self.decoder = nn.Sequential(*[m for a, b in zip(dec[:-1], dec[1:]) for m in (nn.Linear(a, b), nn.ReLU())], nn.Linear(dec[-1], d))
        self.range = DataRange(first_x)
        self.reset_optimizers()

    def reset_optimizers(self) -> None:
        self.opt = adam(self.parameters(), self.cfg.lr, (self.cfg.beta1, self.cfg.beta2))

    def sample_losses(self, x: Tensor) -> Tensor:
        """The negative ELBO of each input, per input value: ``[B]``."""
        target = self.range.to_unit(x).flatten(1)
        h = self.encoder(target)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        logits = self.decoder(z)
        recon = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)
        return (recon + kl) / target.shape[1]

    def loss(self, x: Tensor) -> Tensor:
        return self.sample_losses(x).mean()

    def generate(self, n: int, labels: Tensor | None = None, groups: int = 1) -> Tensor:
        z = torch.randn(n, self.cfg.z_dim, device=self.range.lo.device)
        return self.range.from_unit(torch.sigmoid(self.decoder(z))).reshape(n, *self.shape)


def image_grid(images: Tensor, rows: int, lo: Tensor, hi: Tensor, min_side: int = 28) -> Tensor:
    """``[rows*cols, C, H, W]`` data-space images as one ``[C, rows*(H+1)-1, cols*(W+1)-1]`` grid in ``[0, 1]``;
    images smaller than ``min_side`` are first enlarged by an integer factor (nearest neighbour)."""
    x = ((images - lo) / (hi - lo)).clamp(0, 1).detach().cpu()
    if x.ndim == 2:  # flat inputs: show each as a square-ish strip
        side = math.ceil(math.sqrt(x.shape[1]))
        x = F.pad(x, (0, side * side - x.shape[1])).reshape(-1, 1, side, side)
    factor = max(1, math.ceil(min_side / max(x.shape[2], x.shape[3])))
    if factor > 1:
        x = x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    n, c, h, w = x.shape
    cols = n // rows
    grid = torch.ones(c, rows * (h + 1) - 1, cols * (w + 1) - 1)
    for i in range(rows):
        for j in range(cols):
            grid[:, i * (h + 1) : i * (h + 1) + h, j * (w + 1) : j * (w + 1) + w] = x[i * cols + j]
    return grid


class GeneratedSampleScorer:
    """Scores replayed inputs with a classifier trained on the real training data of all the stream's classes (the
    paper's measure of a generator in MeRGAN, Wu et al. 2018). The classifier is trained on first use, with its own
    seed and the global random state restored afterwards, so scoring changes nothing in the run it measures; it is
    not part of the method's state (a resumed run trains the same one again)."""

    def __init__(self, backbone: object, epochs: int, seed: int = 0) -> None:
        self.backbone, self.epochs, self.seed = backbone, epochs, seed
        self.net: nn.Module | None = None

    def classifier(self, stream: object, device: torch.device) -> nn.Module:
        if self.net is None:
            from metagate.nn.backbones import build_backbone

            tasks = stream.tasks  # type: ignore[attr-defined]
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
                torch.manual_seed(self.seed)
                net = build_backbone(self.backbone, stream.input_shape, stream.num_outputs).to(device)  # type: ignore[arg-type, attr-defined]
                x, y = torch.cat([t.x_train for t in tasks]), torch.cat([t.y_train for t in tasks])
                opt = torch.optim.Adam(net.parameters(), lr=1e-3)
                for _ in range(self.epochs):
                    order = torch.randperm(len(y), device=device)
                    for i in range(0, len(y), 128):
                        idx = order[i : i + 128]
                        opt.zero_grad(set_to_none=True)
                        F.cross_entropy(net(x[idx]), y[idx]).backward()
                        opt.step()
            self.net = net.eval().requires_grad_(False)
        return self.net
