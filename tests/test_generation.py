"""Guided generation on digits with tiny UNets: guidance losses, gradient flow, the guided fine-tuning effect,
resumable sampling and one-line errors for bad input."""

from __future__ import annotations

import huggingface_hub.constants
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from sklearn.datasets import load_digits

import forked
from ssat import distributed
from ssat.config import build
from ssat.data.splits import SemiSupervisedData
from ssat.errors import ConfigError, DataError
from ssat.generation.guidance import CentroidGapGuidance, ConfidenceGuidance, GMMGapGuidance
from ssat.generation.sampling import generate_pool
from ssat.generation.unet import build_unet, check_lambda, load_ddpm, new_scheduler, save_ddpm
from ssat.lightning.ddpm import DDPMModule, to_unit_range
from ssat.models import SmallCNN
from ssat.stages.generate import ddpm_finetune, ddpm_pretrain, sample, training_loader

TINY_UNET = {"block_out_channels": [16, 32]}


def make_trainer(stage, out_dir, max_epochs, callbacks, batches_per_epoch):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=False, enable_checkpointing=True,
                     callbacks=callbacks, enable_model_summary=False, enable_progress_bar=False,
                     default_root_dir=str(out_dir))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> SemiSupervisedData:
    digits = load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    return SemiSupervisedData(images, labels, images[:10], labels[:10], images[:10], None, images[:10], labels[:10],
                              [str(d) for d in range(10)])


@pytest.fixture(scope="module")
def classifier(data) -> SmallCNN:
    """A SmallCNN trained for 300 steps on digits with Gaussian noise (sigma 0.3), then frozen in eval mode.

    The guidance differentiates the classifier at x0_hat, a blurry image at mid t; a classifier trained on clean
    images only gives gradients there that change from one fine-tuning run to the next, one trained on noisy
    images gives gradients that move the samples consistently."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, mean=[0.3], std=[0.4], width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.from_numpy(data.labeled_images).float() / 255
    y = torch.from_numpy(data.labeled_labels)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        rows = torch.randint(0, len(x), (64,), generator=generator)
        noisy = (x[rows] + 0.3 * torch.randn(x[rows].shape, generator=generator)).clamp(0, 1)
        loss = F.cross_entropy(model(noisy), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def bank(classifier, data) -> torch.Tensor:
    with torch.no_grad():
        return classifier(torch.from_numpy(data.labeled_images).float() / 255)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data) -> str:
    """A tiny UNet trained for 6 short epochs on digits through ddpm_pretrain, in two calls as after a crash."""
    out = tmp_path_factory.mktemp("pretrain")
    stopped = ddpm_pretrain(data.labeled_images, out, make_trainer, TINY_UNET, epochs=3, batch_size=64, lr=2e-3, seed=0)
    info = ddpm_pretrain(data.labeled_images, out, make_trainer, TINY_UNET, epochs=6, batch_size=64, lr=2e-3, seed=0)
    assert (stopped["steps"], info["steps"]) == (3 * 29, 6 * 29), "the second call resumes from last.ckpt"
    return str(out / "unet")


# --- the guidance losses on hand-made logits


def brute_force_gap(logits: np.ndarray, centres: np.ndarray, valid: np.ndarray) -> float:
    gaps = []
    for row in logits:
        c = int(np.argmax(row))
        d = sorted(float(np.sqrt(((row - centres[c, k]) ** 2).sum())) for k in range(centres.shape[1]) if valid[c, k])
        gaps.append(d[1] - d[0] if len(d) >= 2 else 0.0)
    return float(np.mean(gaps))


def test_confidence_guidance_sign_is_the_papers_by_default_and_the_releases_on_request():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 5.0, 1.0]])
    probs = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    assert ConfidenceGuidance()(logits).item() == pytest.approx(probs.max(1).mean(), abs=1e-6)
    assert ConfidenceGuidance(sign="release")(logits).item() == pytest.approx(-probs.max(1).mean(), abs=1e-6)
    with pytest.raises(ConfigError) as err:
        ConfidenceGuidance(sign="minus")
    assert one_line(err) == "selector.guidance.sign='minus' is not one of paper, release"


@pytest.mark.parametrize("guidance_class", [CentroidGapGuidance, GMMGapGuidance])
def test_cluster_gap_equals_brute_force_and_survives_tiny_classes(guidance_class):
    rng = np.random.default_rng(0)
    blobs = np.array([[6.0, 0, 0, 0], [5.0, 3, 0, 0], [5.0, 0, 3, 0]])
    class0 = np.concatenate([b + 0.3 * rng.standard_normal((40, 4)) for b in blobs])
    class1 = np.array([[0.0, 4.0, 0.0, 1.0]])  # one point: one centre, no gap
    class3 = np.array([[0.0, 0.0, 1.0, 4.0], [0.0, 1.0, 0.0, 5.0], [1.0, 0.0, 0.0, 6.0]])  # 3 points < 5 components
    bank = np.concatenate([class0, class1, class3]).astype(np.float32)  # class 2 is never predicted: no centre
    guidance = guidance_class(components=5).fit(torch.from_numpy(bank), torch.from_numpy(bank.argmax(1)))
    assert guidance.valid.sum(1).tolist() == [5, 1, 0, 3]

    samples = torch.from_numpy(np.concatenate([
        rng.standard_normal((20, 4)) * 2 + [5, 1, 1, 0],   # class 0
        [[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]],      # class 1 (one centre), class 2 (none)
        rng.standard_normal((5, 4)) + [0, 0, 0, 5],        # class 3
    ]).astype(np.float32)).requires_grad_(True)
    loss = guidance(samples)
    expected = brute_force_gap(samples.detach().numpy(), guidance.centres.numpy(), guidance.valid.numpy())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert guidance.mean_gap(samples) == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(samples.grad).all()
    assert samples.grad[20:22].abs().sum() == 0, "a class without two centres adds no gradient"


# --- gradient flow: L_reg reaches the UNet, never the classifier


@pytest.mark.parametrize("guidance_class", [ConfidenceGuidance, CentroidGapGuidance, GMMGapGuidance])
def test_guidance_gradient_reaches_the_unet_and_not_the_classifier(guidance_class, classifier, bank, data):
    guidance = guidance_class().fit(bank, bank.argmax(1))
    torch.manual_seed(0)
    module = DDPMModule(build_unet(8, 1, TINY_UNET), new_scheduler(), classifier, guidance, lam=0.5)
    module.train()
    assert module.unet.training and not classifier.training, "the classifier stays in eval mode"
    x0 = to_unit_range(torch.from_numpy(data.labeled_images[:32]))
    t = torch.full((32,), 100)
    module.losses(x0, t, torch.randn_like(x0))["reg"].backward()
    unet_grad = sum(float(p.grad.abs().sum()) for p in module.unet.parameters() if p.grad is not None)
    assert unet_grad > 0, "L_reg alone must move the UNet"
    assert all(p.grad is None for p in classifier.parameters())
    assert all(id(p) not in {id(q) for q in classifier.parameters()}
               for group in module.configure_optimizers().param_groups for p in group["params"])


# --- the guided fine-tuning does what it is for


def x0_hat_confidence(module: DDPMModule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> float:
    """Mean max softmax of the classifier on the module's predicted clean samples for this batch, noise and t."""
    with torch.no_grad():
        x_t = module.noise_scheduler.add_noise(x0, eps, t)
        x0_hat = module.predicted_x0(x_t, t, module.unet(x_t, t).sample)
        return float(module.classifier((x0_hat + 1) / 2).softmax(1).amax(1).mean())


@pytest.mark.parametrize("sign, direction", [(None, -1), ("release", +1)])
def test_one_pcg_step_lowers_confidence_by_default_and_raises_it_with_the_release_sign(sign, direction,
                                                                                        classifier, data):
    """METHODS.md section 3: PCG aims at low-confidence samples; the release's sign pushes confidence up. One Adam
    step of the real DDPMModule (the UNet and the guidance built from the config tree) on a fixed batch, noise and
    timesteps moves the mean max softmax of x0_hat down with the default sign and up with sign=release."""
    overrides = ["selector=pcg", *([f"selector.guidance.sign={sign}"] if sign else [])]
    with initialize_config_module(config_module="ssat.conf", version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    guidance = build(cfg.selector).guidance
    assert guidance.describe() == {"name": "pcg", "sign": sign or "paper"}, "what results.json records"
    torch.manual_seed(0)
    module = DDPMModule(build_unet(8, 1, cfg.generation.unet), new_scheduler(), classifier, guidance, lam=20.0,
                        lr=1e-3)
    module.train()
    x0 = to_unit_range(torch.from_numpy(data.labeled_images[:64]))
    t = torch.linspace(50, 400, 64).long()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    before = x0_hat_confidence(module, x0, t, eps)
    optimizer = module.configure_optimizers()
    parts = module.losses(x0, t, eps)
    (parts["ddpm"] + module.lam * parts["reg"]).backward()
    optimizer.step()
    after = x0_hat_confidence(module, x0, t, eps)
    assert direction * (after - before) > 0.01, (before, after)


def sample_gap(unet_dir, out_dir, classifier, guidance) -> float:
    sample(unet_dir, out_dir, n=256, batch_size=256, seed=0, scheduler="ddpm", num_inference_steps=4)
    images = np.load(out_dir / "images.npy")
    with torch.no_grad():
        return guidance.mean_gap(classifier(torch.from_numpy(images).float() / 255))


def test_lcg_km_finetuning_lowers_the_centroid_gap_of_samples(pretrained, classifier, data, tmp_path):
    """Same pretrained DDPM, same fine-tuning batches and seeds, same sampler noise: only lambda differs.

    L_reg's gradient w.r.t. eps_hat scales like sqrt(1 - alpha_bar) / sqrt(alpha_bar): the guidance reshapes the
    x0 predictions at mid and large t and hardly touches the last denoising steps. With 4 ancestral steps the
    last step starts at t = 250, where it acts. Measured over 3 pretrained DDPMs x 2 seeds: guided / before
    0.04-0.50, plain / before 0.89-0.94. (With 10 DDIM steps, or a classifier trained on clean images only, the
    sample gap fell in most runs but not all.)"""
    guidance = CentroidGapGuidance(components=5)
    guided, plain = tmp_path / "guided", tmp_path / "plain"
    common = dict(epochs=4, batch_size=64, lr=3e-4, bank_size=5000, seed=1)
    info = ddpm_finetune(data, classifier, pretrained, guided, make_trainer, guidance, lam=10.0, **common)
    ddpm_finetune(data, classifier, pretrained, plain, make_trainer, CentroidGapGuidance(components=5), lam=0.0,
                  **common)
    assert info["steps"] == 4 * 29 and info["bank_size"] == len(data.labeled_images)
    gap_before = sample_gap(pretrained, tmp_path / "s0", classifier, guidance)
    gap_guided = sample_gap(str(guided / "unet"), tmp_path / "s1", classifier, guidance)
    gap_plain = sample_gap(str(plain / "unet"), tmp_path / "s2", classifier, guidance)
    assert gap_guided < 0.7 * gap_before, (gap_before, gap_guided)
    assert gap_guided < 0.7 * gap_plain, ("the decrease is the guidance's, not the extra DDPM training's",
                                          gap_plain, gap_guided)
    assert not classifier.training and all(not p.requires_grad for p in classifier.parameters())


# --- resumable sampling


class CrashAfter(torch.nn.Module):
    """The UNet, but its forward pass fails after a number of calls: a crash in the middle of sampling."""

    def __init__(self, unet, calls: int):
        super().__init__()
        self.unet, self.config, self.left, self.calls = unet, unet.config, calls, 0

    def forward(self, x, t):
        self.calls += 1
        if self.left == 0:
            raise RuntimeError("simulated crash")
        self.left -= 1
        return self.unet(x, t)


def test_interrupted_sampling_resumes_without_duplicates_or_gaps(tmp_path):
    torch.manual_seed(0)
    unet, config = build_unet(8, 1, TINY_UNET), new_scheduler().config
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir()
    broken.mkdir()
    # Ancestral DDPM with 3 steps: noise enters at every step, so every draw must come from the batch's generator.
    args = dict(n=10, batch_size=3, seed=7, scheduler="ddpm", num_inference_steps=3)
    generate_pool(unet, config, whole, **args)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_pool(CrashAfter(unet, calls=2 * 3 + 1), config, broken, **args)
    resumed = CrashAfter(unet, calls=10**6)
    info = generate_pool(resumed, config, broken, **args)
    assert info["resumed_at"] == 6 and resumed.calls == 2 * 3, "only the two unfinished batches are sampled again"
    np.testing.assert_array_equal(np.load(whole / "images.npy"), np.load(broken / "images.npy"))
    assert len(np.unique(np.load(whole / "images.npy").reshape(10, -1), axis=0)) == 10


def _sample_on_rank(rank: int, world_size: int, init_file: str, out_dir: str, args: dict) -> None:
    """One DDP rank (gloo): the same seeded UNet as the single process, sampling its share of the pool."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        generate_pool(build_unet(8, 1, TINY_UNET), new_scheduler().config, out_dir, **args)
    finally:
        dist.destroy_process_group()


def test_two_ranks_sample_the_pool_a_single_process_samples(tmp_path):
    """Each rank samples a contiguous share of the batches, each batch from its own generator; rank 0 assembles."""
    args = dict(n=10, batch_size=3, seed=7, scheduler="ddpm", num_inference_steps=3)
    torch.manual_seed(0)
    single = tmp_path / "single"
    info = generate_pool(build_unet(8, 1, TINY_UNET), new_scheduler().config, single, **args)
    assert "ranks" not in info
    sharded = tmp_path / "sharded"
    forked.start_server()  # the ranks fork from the worker's forkserver, which has imported torch already
    torch.multiprocessing.start_processes(_sample_on_rank, args=(2, str(tmp_path / "init"), str(sharded), args),
                                          nprocs=2, start_method="forkserver")
    np.testing.assert_array_equal(np.load(sharded / "images.npy"), np.load(single / "images.npy"))
    assert sorted(p.name for p in sharded.iterdir()) == ["images.npy", "progress.json"]  # shards assembled, gone


@pytest.mark.parametrize("selector, guidance_class", [
    ("pcg", ConfidenceGuidance), ("lcg_km", CentroidGapGuidance), ("lcg_gmm", GMMGapGuidance)])
def test_selector_configs_build_their_guidance(selector, guidance_class):
    with initialize_config_module(config_module="ssat.conf", version_base=None):
        cfg = compose(config_name="config", overrides=[f"selector={selector}"])
    built = build(cfg.selector)
    assert built.name == selector and type(built.guidance) is guidance_class
    assert cfg.generation.lam == 0.5


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_negative_lambda_is_a_config_error(data, classifier, tmp_path):
    with pytest.raises(ConfigError) as err:
        check_lambda(-1)
    assert one_line(err) == "generation.lam=-1 must be >= 0"
    with pytest.raises(ConfigError, match="generation.lam=-1 must be >= 0"):
        ddpm_finetune(data, classifier, "no/such-model", tmp_path, make_trainer, ConfidenceGuidance(), lam=-1,
                      epochs=1, batch_size=64, lr=1e-3, bank_size=100, seed=0)
    with pytest.raises(ConfigError, match="generation.lam=-0.5"):
        DDPMModule(build_unet(8, 1, TINY_UNET), new_scheduler(), classifier, ConfidenceGuidance(), lam=-0.5)


def test_unet_of_the_wrong_size_or_channels_is_a_config_error(tmp_path):
    save_ddpm(build_unet(8, 1, TINY_UNET), new_scheduler(), tmp_path / "unet")
    with pytest.raises(ConfigError) as err:
        load_ddpm(str(tmp_path / "unet"), image_size=32, channels=1)
    assert "8x8" in one_line(err) and "dataset.image_size=32" in one_line(err)
    with pytest.raises(ConfigError) as err:
        load_ddpm(str(tmp_path / "unet"), image_size=8, channels=3)
    assert "in_channels=1" in one_line(err) and "dataset.channels=3" in one_line(err)
    with pytest.raises(ConfigError, match="divisible by 2"):
        build_unet(9, 1, TINY_UNET)
    unet, scheduler = load_ddpm(str(tmp_path / "unet"), image_size=8, channels=1)
    assert scheduler.config.num_train_timesteps == 1000 and unet.config.sample_size == 8


def test_a_local_folder_that_is_not_a_unet_is_a_data_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as err:
        load_ddpm(str(empty))
    assert "not a diffusers UNet folder" in one_line(err)
    scheduler_only = tmp_path / "scheduler_only"
    new_scheduler().save_pretrained(scheduler_only)
    (scheduler_only / "config.json").write_text((scheduler_only / "scheduler_config.json").read_text())
    with pytest.raises(DataError) as err:
        load_ddpm(str(scheduler_only))
    assert "not a UNet2DModel" in one_line(err)


def test_an_unreachable_hub_id_is_a_one_line_data_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        load_ddpm("google/ddpm-cifar10-32", image_size=32, channels=3)
    message = one_line(err)
    assert "google/ddpm-cifar10-32" in message and "generation.pretrained=null" in message


def test_ddpm_training_loader_gives_each_rank_its_own_share(monkeypatch):
    """Under DDP the ranks train on disjoint shares that together cover the images, reshuffled each epoch."""
    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    shares = {}
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        loader = training_loader(images, batch_size=8, seed=3)
        shares[rank] = [int(v) for (batch,) in loader for v in batch.flatten()]
        loader.sampler.set_epoch(1)
        assert [int(v) for (batch,) in loader for v in batch.flatten()] != shares[rank]
    assert len(shares[0]) == len(shares[1]) == 20
    assert set(shares[0]).isdisjoint(shares[1]) and set(shares[0]) | set(shares[1]) == set(range(40))
