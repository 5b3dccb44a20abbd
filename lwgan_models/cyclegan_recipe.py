"""Training CycleGAN as in the paper and junyanz/pytorch-CycleGAN-and-pix2pix, resumable and seeded.

Follows `models/cycle_gan_model.py`, `util/image_pool.py`, `models/networks.py` (LSGAN `GANLoss`,
the 'linear' `get_scheduler`) and `train.py`: two generators, two 70x70 PatchGANs, LSGAN
adversarial loss, cycle loss x10, identity loss x0.5x10, a 50-image pool of past fakes per
domain, Adam(2e-4, (0.5, 0.999)), the discriminator loss halved, and a learning rate constant
for `n_epochs` then decaying linearly towards 0 over `n_epochs_decay`.

Naming is upstream's, not the paper's: G_A maps A->B (paper G), G_B maps B->A (paper F), and
D_A judges domain B images, the outputs of G_A (paper D_Y); D_B judges domain A (paper D_X).
The saved files are therefore interchangeable with upstream's `latest_net_{G_A,G_B,D_A,D_B}.pth`.

Differences from upstream, none of which changes the maths of a step:
- The scheduler steps at the end of each epoch (train.py up to 2019). Upstream later moved the
  call to the start of the epoch, which shortens the constant phase by one epoch and runs the
  last epoch at lr 0; the end-of-epoch placement is the paper's schedule.
- The image pools draw from their own seeded `random.Random` instead of the global `random`,
  and the shuffle order comes from (seed, epoch): a run resumed from its saved state takes the
  exact steps an uninterrupted run takes.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from errors import UserError
from lwgan_models.cyclegan import GENERATORS, define_D, define_G
from lwgan_models.data import UnpairedImageFolder, make_loader
from lwgan_models.registry import CYCLEGAN, build_generator, repo_relative
from lwgan_models.standin_data import REPO_DATASET
from lwgan_models.training import (
    TrainingRun,
    atomic_write_bytes,
    final_losses,
    read_card,
)

COMPANIONS = ("G_B", "D_A", "D_B")  # saved beside the G_A checkpoint
LOSS_NAMES = ("D_A", "G_A", "cycle_A", "idt_A", "D_B", "G_B", "cycle_B", "idt_B")  # upstream's order
# A crop floor that leaves the 3-layer PatchGAN a 2x2 patch grid, and the size factor each
# generator needs so that its output matches its input.
MIN_CROP_SIZE = 32
GENERATOR_SIZE_MULTIPLE = {"resnet_6blocks": 4, "resnet_9blocks": 4, "unet_128": 128, "unet_256": 256}

ImageMap = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CycleGANConfig:
    """Everything that shapes a trained CycleGAN; upstream defaults except the slim sizes."""

    dataroot: Path = REPO_DATASET
    netG: str = "resnet_6blocks"
    ngf: int = 16
    ndf: int = 16  # slim discriminators keep the committed companions small
    load_size: int = 143  # upstream's 286/256 ratio at 128 px
    crop_size: int = 128
    batch_size: int = 1
    n_epochs: int = 100
    n_epochs_decay: int = 100
    lr: float = 2e-4
    beta1: float = 0.5
    lambda_A: float = 10.0  # cycle weight A -> B -> A
    lambda_B: float = 10.0  # cycle weight B -> A -> B
    lambda_identity: float = 0.5  # identity weight, relative to lambda_A / lambda_B
    pool_size: int = 50
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 1000

    def __post_init__(self) -> None:
        self.dataroot = Path(self.dataroot)

    @property
    def arch(self) -> dict:
        """The generator as the registry builds it."""
        return {"family": CYCLEGAN.name, "netG": self.netG, "ngf": self.ngf}

    def validate(self) -> None:
        if self.netG not in GENERATORS:
            raise UserError(f"generator {self.netG!r} is unknown; expected one of {', '.join(GENERATORS)}")
        positive = {"ngf": self.ngf, "ndf": self.ndf, "batch_size": self.batch_size,
                    "log_every": self.log_every, "checkpoint_every": self.checkpoint_every}
        non_negative = {"n_epochs": self.n_epochs, "n_epochs_decay": self.n_epochs_decay,
                        "pool_size": self.pool_size, "lambda_A": self.lambda_A, "lambda_B": self.lambda_B,
                        "lambda_identity": self.lambda_identity}
        for name, value in positive.items():
            if value <= 0:
                raise UserError(f"{name}={value}; expected a positive value")
        for name, value in non_negative.items():
            if value < 0:
                raise UserError(f"{name}={value}; expected a value >= 0")
        if self.n_epochs + self.n_epochs_decay == 0:
            raise UserError("n_epochs + n_epochs_decay is 0; expected at least one epoch")
        if not 0 < self.lr or not 0 <= self.beta1 < 1:
            raise UserError(f"lr={self.lr}, beta1={self.beta1}; expected lr > 0 and 0 <= beta1 < 1")
        multiple = GENERATOR_SIZE_MULTIPLE[self.netG]
        if self.crop_size < MIN_CROP_SIZE or self.crop_size % multiple:
            raise UserError(f"crop_size={self.crop_size} does not suit {self.netG}; expected a multiple "
                            f"of {multiple} and at least {MIN_CROP_SIZE}")

    @property
    def total_epochs(self) -> int:
        return self.n_epochs + self.n_epochs_decay

    def to_dict(self) -> dict:
        """JSON-ready; the dataroot is repo-relative when inside the repo, so cards do not name a checkout."""
        data = asdict(self)
        data["dataroot"] = repo_relative(self.dataroot)
        return data


class ImagePool:
    """A buffer of past fakes, so the discriminators also see older generator outputs (upstream semantics).

    Until `pool_size` images are stored each new image is stored and returned; after that, each
    image is, with probability 0.5, swapped for a random stored one (which is returned), else
    returned as is. `pool_size` 0 returns the batch unchanged.
    """

    def __init__(self, pool_size: int, seed: int | str = 0):
        self.pool_size = pool_size
        self.images: list[torch.Tensor] = []
        self._rng = random.Random(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.pool_size == 0:
            return images
        returned = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.pool_size:
                self.images.append(image)
                returned.append(image)
            elif self._rng.uniform(0, 1) > 0.5:
                slot = self._rng.randint(0, self.pool_size - 1)
                returned.append(self.images[slot].clone())
                self.images[slot] = image
            else:
                returned.append(image)
        return torch.cat(returned, 0)

    def state_dict(self) -> dict:
        return {"images": list(self.images), "rng": self._rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.images = list(state["images"])
        self._rng.setstate(state["rng"])


def linear_decay_factor(epochs_done: int, n_epochs: int, n_epochs_decay: int) -> float:
    """Upstream's 'linear' lambda rule (epoch_count=1): the lr multiplier after `epochs_done` epochs."""
    return 1.0 - max(0, epochs_done + 1 - n_epochs) / float(n_epochs_decay + 1)


def lsgan_loss(prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """Upstream `GANLoss('lsgan')`: MSE against a 1 (real) or 0 (fake) target shaped like the patch output."""
    target = torch.tensor(1.0 if target_is_real else 0.0).expand_as(prediction)
    return nn.functional.mse_loss(prediction, target)


def _set_requires_grad(nets: list[nn.Module], requires_grad: bool) -> None:
    for net in nets:
        for param in net.parameters():
            param.requires_grad = requires_grad


class CycleGANModel:
    """The four networks, their optimisers, schedulers and image pools: everything a step changes."""

    def __init__(self, config: CycleGANConfig):
        self.config = config
        # Built in upstream's order, so the seed fixes the same initial weights.
        self.G_A = define_G(3, 3, config.ngf, config.netG)
        self.G_B = define_G(3, 3, config.ngf, config.netG)
        self.D_A = define_D(3, config.ndf, "basic")
        self.D_B = define_D(3, config.ndf, "basic")
        self.fake_A_pool = ImagePool(config.pool_size, seed=f"{config.seed}:fake_A")
        self.fake_B_pool = ImagePool(config.pool_size, seed=f"{config.seed}:fake_B")
        betas = (config.beta1, 0.999)
        self.optimizer_G = torch.optim.Adam(
            itertools.chain(self.G_A.parameters(), self.G_B.parameters()), lr=config.lr, betas=betas)
        self.optimizer_D = torch.optim.Adam(
            itertools.chain(self.D_A.parameters(), self.D_B.parameters()), lr=config.lr, betas=betas)

        def rule(epochs_done: int) -> float:
            return linear_decay_factor(epochs_done, config.n_epochs, config.n_epochs_decay)

        self.schedulers = [LambdaLR(self.optimizer_G, rule), LambdaLR(self.optimizer_D, rule)]

    @property
    def nets(self) -> dict[str, nn.Module]:
        return {"G_A": self.G_A, "G_B": self.G_B, "D_A": self.D_A, "D_B": self.D_B}

    def optimize(self, real_A: torch.Tensor, real_B: torch.Tensor) -> dict[str, float]:
        """One upstream `optimize_parameters`: generators first (discriminators frozen), then discriminators."""
        c = self.config
        fake_B = self.G_A(real_A)
        rec_A = self.G_B(fake_B)
        fake_A = self.G_B(real_B)
        rec_B = self.G_A(fake_A)

        _set_requires_grad([self.D_A, self.D_B], False)
        self.optimizer_G.zero_grad()
        if c.lambda_identity > 0:
            loss_idt_A = nn.functional.l1_loss(self.G_A(real_B), real_B) * c.lambda_B * c.lambda_identity
            loss_idt_B = nn.functional.l1_loss(self.G_B(real_A), real_A) * c.lambda_A * c.lambda_identity
        else:
            loss_idt_A = loss_idt_B = torch.zeros(())
        loss_G_A = lsgan_loss(self.D_A(fake_B), True)
        loss_G_B = lsgan_loss(self.D_B(fake_A), True)
        loss_cycle_A = nn.functional.l1_loss(rec_A, real_A) * c.lambda_A
        loss_cycle_B = nn.functional.l1_loss(rec_B, real_B) * c.lambda_B
        loss_G = loss_G_A + loss_G_B + loss_cycle_A + loss_cycle_B + loss_idt_A + loss_idt_B
        loss_G.backward()
        self.optimizer_G.step()

        _set_requires_grad([self.D_A, self.D_B], True)
        self.optimizer_D.zero_grad()
        loss_D_A = self._backward_D(self.D_A, real_B, self.fake_B_pool.query(fake_B))
        loss_D_B = self._backward_D(self.D_B, real_A, self.fake_A_pool.query(fake_A))
        self.optimizer_D.step()

        losses = {"D_A": loss_D_A, "G_A": loss_G_A, "cycle_A": loss_cycle_A, "idt_A": loss_idt_A,
                  "D_B": loss_D_B, "G_B": loss_G_B, "cycle_B": loss_cycle_B, "idt_B": loss_idt_B}
        return {name: float(value.detach()) for name, value in losses.items()}

    @staticmethod
    def _backward_D(net: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        loss = (lsgan_loss(net(real), True) + lsgan_loss(net(fake.detach()), False)) * 0.5
        loss.backward()
        return loss

    def end_epoch(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def state_dict(self) -> dict:
        return {
            "nets": {name: net.state_dict() for name, net in self.nets.items()},
            "optimizer_G": self.optimizer_G.state_dict(),
            "optimizer_D": self.optimizer_D.state_dict(),
            "schedulers": [scheduler.state_dict() for scheduler in self.schedulers],
            "pools": {"fake_A": self.fake_A_pool.state_dict(), "fake_B": self.fake_B_pool.state_dict()},
        }

    def load_state_dict(self, state: dict) -> None:
        for name, net in self.nets.items():
            net.load_state_dict(state["nets"][name])
        self.optimizer_G.load_state_dict(state["optimizer_G"])
        self.optimizer_D.load_state_dict(state["optimizer_D"])
        for scheduler, scheduler_state in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(scheduler_state)
        self.fake_A_pool.load_state_dict(state["pools"]["fake_A"])
        self.fake_B_pool.load_state_dict(state["pools"]["fake_B"])


@torch.no_grad()
def generator_loss(g_a: ImageMap, g_b: ImageMap, d_a: ImageMap, real_a: torch.Tensor, real_b: torch.Tensor,
                   lambda_cycle: float = 10.0, lambda_identity: float = 0.5) -> dict[str, float]:
    """The A->B half of the CycleGAN generator objective, as a metric for any implementation of G_A.

    `g_a` may be any tensor->tensor callable (e.g. a compiled or quantized model wrapped in a
    function); `g_b` and `d_a` are the trained companions. `d_a` is upstream's D_A, the
    discriminator of domain B that G_A was trained against (paper D_Y).
    """
    fake_b = g_a(real_a)
    adversarial = lsgan_loss(d_a(fake_b), True)
    cycle = nn.functional.l1_loss(g_b(fake_b), real_a) * lambda_cycle
    identity = nn.functional.l1_loss(g_a(real_b), real_b) * lambda_cycle * lambda_identity
    terms = {"adversarial": adversarial, "cycle": cycle, "identity": identity}
    return {**{name: float(value) for name, value in terms.items()}, "total": float(sum(terms.values()))}


def evaluate_generator_loss(g_a: ImageMap, g_b: ImageMap, d_a: ImageMap, dataset: UnpairedImageFolder,
                            lambda_cycle: float = 10.0, lambda_identity: float = 0.5) -> dict[str, float]:
    """`generator_loss` averaged over every item of `dataset` (use the deterministic test phase)."""
    sums: dict[str, float] = {}
    for batch in make_loader(dataset, batch_size=1, shuffle=False, seed=None):
        for name, value in generator_loss(g_a, g_b, d_a, batch["A"], batch["B"],
                                          lambda_cycle, lambda_identity).items():
            sums[name] = sums.get(name, 0.0) + value
    return {name: round(total / len(dataset), 6) for name, total in sums.items()}


def companion_path(checkpoint: Path, name: str) -> Path:
    """Where the `name` network (G_B, D_A, D_B) of the run that wrote `checkpoint` lives."""
    return checkpoint.with_name(f"{checkpoint.stem}.{name}.pt")


def load_companions(checkpoint: Path) -> tuple[nn.Module, nn.Module]:
    """G_B and D_A (the discriminator of domain B) trained with the G_A in `checkpoint`, for `generator_loss`."""
    checkpoint = Path(checkpoint)
    card = read_card(checkpoint)
    if card.get("arch", {}).get("family") != CYCLEGAN.name or "ndf" not in card:
        raise UserError(f"checkpoint {checkpoint} was not written by the CycleGAN recipe; "
                        "expected a card with a cyclegan arch and ndf")
    networks = {"G_B": build_generator(card["arch"]), "D_A": define_D(3, card["ndf"], "basic")}
    for name, net in networks.items():
        path = companion_path(checkpoint, name)
        if not path.is_file():
            raise UserError(f"companion {path} of {checkpoint} is missing; expected the {name} state_dict "
                            "the CycleGAN recipe saves beside its checkpoint")
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (RuntimeError, KeyError) as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            raise UserError(f"companion {path} does not fit its card's arch ({reason})") from exc
        net.eval()
    return networks["G_B"], networks["D_A"]


def _epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one epoch: a resumed run reshuffles exactly as an uninterrupted one."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def train_cyclegan(config: CycleGANConfig, final_checkpoint: Path, work_dir: Path,
                   stop_after: int | None = None) -> Path | None:
    """Train (or resume) to `final_checkpoint`, G_A's state_dict, with G_B/D_A/D_B and a card beside it.

    Returns the checkpoint, or None when `stop_after` total steps are reached first (the state is
    saved, so calling again resumes).
    """
    final_checkpoint = Path(final_checkpoint)
    config.validate()
    if stop_after is not None and stop_after < 1:
        raise UserError(f"stop_after={stop_after}; expected a step count >= 1")
    # Both splits are opened before anything is written, so a bad dataset fails at once.
    train_set = UnpairedImageFolder(config.dataroot, "train", config.load_size, config.crop_size,
                                    flip=True, seed=config.seed)
    test_set = UnpairedImageFolder(config.dataroot, "test", config.load_size, config.crop_size, flip=False)

    run = TrainingRun(final_checkpoint.stem, config.to_dict(), final_checkpoint, work_dir)
    state = run.start()
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    model = CycleGANModel(config)
    epoch, step, batches_done, window = 0, 0, 0, {}
    if state is not None:
        model.load_state_dict(state["model"])
        epoch, step, batches_done = state["epoch"], state["step"], state["batches_done_in_epoch"]
        window = state["loss_window"]
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])

    def save_state() -> None:
        run.save_state({
            "model": model.state_dict(), "epoch": epoch, "step": step, "batches_done_in_epoch": batches_done,
            "loss_window": window, "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
        })

    steps_per_epoch = -(-len(train_set) // config.batch_size)
    total_steps = steps_per_epoch * config.total_epochs

    def should_stop() -> bool:
        return stop_after is not None and stop_after <= step < total_steps

    if should_stop():
        return None
    while epoch < config.total_epochs:
        train_set.set_epoch(epoch)
        loader = make_loader(train_set, config.batch_size, shuffle=True, seed=_epoch_seed(config.seed, epoch))
        for batch in itertools.islice(loader, batches_done, None):
            losses = model.optimize(batch["A"], batch["B"])
            step += 1
            batches_done += 1
            window = _accumulate(window, losses)
            if step % config.log_every == 0 or step == total_steps:
                run.log(step, total_steps, _mean_losses(window))
                window = {}
            if batches_done == steps_per_epoch:
                model.end_epoch()
                epoch, batches_done = epoch + 1, 0
                save_state()
            elif step % config.checkpoint_every == 0 or step == stop_after:
                save_state()
            if should_stop():
                return None

    g_b, d_a = model.G_B.eval(), model.D_A.eval()
    for name in COMPANIONS:
        weights = model.nets[name].state_dict()
        atomic_write_bytes(companion_path(final_checkpoint, name), lambda tmp, w=weights: torch.save(w, tmp))
    return run.finish(model.G_A.state_dict(), {
        "arch": config.arch,
        "ndf": config.ndf,
        "seed": config.seed,
        "steps": step,
        "epochs": config.total_epochs,
        "final_losses": final_losses(run.history()),
        "companions": {name: companion_path(final_checkpoint, name).name for name in COMPANIONS},
        "generator_loss": evaluate_generator_loss(model.G_A.eval(), g_b, d_a, test_set,
                                                  config.lambda_A, config.lambda_identity),
        "generator_loss_images": len(test_set),
    })


def _accumulate(window: dict, losses: dict[str, float]) -> dict:
    """Running sums since the last log line, plus their count (`steps`)."""
    summed = {name: window.get(name, 0.0) + value for name, value in losses.items()}
    return {**summed, "steps": window.get("steps", 0) + 1}


def _mean_losses(window: dict) -> dict[str, float]:
    return {name: window[name] / window["steps"] for name in LOSS_NAMES}


def train_registry_model(arch: dict, checkpoint: Path, work_dir: Path, epochs: int | None, steps: int | None,
                         crop_size: int | None, dataroot: str | None) -> None:
    """`invoke train` for a CycleGAN arch: 100 + 100 epochs unless told, loading at upstream's 286/256 of the crop."""
    if steps:
        raise UserError("--steps is for style transfer; CycleGAN trains for --epochs")
    half = epochs or 100
    crop = {"crop_size": crop_size, "load_size": round(crop_size * 286 / 256)} if crop_size else {}
    config = CycleGANConfig(netG=arch["netG"], ngf=arch["ngf"], n_epochs=half, n_epochs_decay=half,
                            **({"dataroot": Path(dataroot)} if dataroot else {}), **crop)
    train_cyclegan(config, checkpoint, work_dir)
