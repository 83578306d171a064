"""Training augmentation on the device (here the CPU, with the same functions a GPU runs):
flip, scale and crop/pad keep image and label aligned; padding is ignore, never background;
colour jitter is per frame; the training loop applies it to raw batches only when asked."""

import numpy as np
import pytest
import torch

from pipelines.core.labels import IGNORE_INDEX
from pipelines.training.augment import Augment, augment_batch, step_generator


def _gen(seed: int) -> torch.Generator:
    return step_generator(torch.device("cpu"), seed)


def _painted(seed: int = 0, n: int = 1):
    """Labels of 16x16 blocks (96 x 160) with an asymmetric left edge, and images painted
    from them with one colour per class, so that every pixel's colour names its label."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(1, 256, (8, 3)).astype(np.uint8)  # no class is black
    labels = []
    for _ in range(n):
        blocks = rng.integers(0, 7, (6, 10))
        label = np.kron(blocks, np.ones((16, 16), dtype=np.int64)).astype(np.uint8)
        label[:, :24] = 7  # class 7 only on the left
        labels.append(label)
    label = np.stack(labels)
    return torch.from_numpy(palette[label]), torch.from_numpy(label), palette


def test_flip_only_mirrors_both_exactly():
    image = torch.arange(2 * 3 * 3, dtype=torch.uint8).reshape(1, 2, 3, 3)
    label = torch.tensor([[[0, 1, 2], [3, 4, 5]]], dtype=torch.uint8)
    x, y = Augment(hflip=1.0, scale=(1.0, 1.0), colour=0.0)(image, label, _gen(0))
    assert torch.equal(y, label.flip(-1).long())
    assert torch.equal(x.round().to(torch.uint8), image.flip(2).permute(0, 3, 1, 2))


def test_no_augmentation_is_the_identity():
    image, label, _ = _painted()
    x, y = Augment(hflip=0.0, scale=(1.0, 1.0), colour=0.0)(image, label, _gen(0))
    assert torch.equal(x, image.permute(0, 3, 1, 2).float()) and torch.equal(y, label.long())


def test_shrinking_pads_label_with_ignore_and_image_with_black():
    image = torch.full((1, 40, 40, 3), 200, dtype=torch.uint8)
    label = torch.zeros((1, 40, 40), dtype=torch.uint8)
    x, y = Augment(hflip=0.0, scale=(0.5, 0.5), colour=0.0)(image, label, _gen(0))
    assert int((y == IGNORE_INDEX).sum()) == 40 * 40 - 20 * 20
    assert int((y == 0).sum()) == 20 * 20  # the frame itself stays background
    assert (x.permute(0, 2, 3, 1)[y == IGNORE_INDEX] == 0).all()


def test_scale_and_crop_keep_image_and_label_aligned():
    """After flip, scale and crop/pad, every pixel's colour still belongs to its label: a
    shift, a flip of one but not the other, or another window shows as a mismatch. Checked
    away from class boundaries, where bilinear (image) and nearest (label) legitimately
    differ, in a batch of 16 frames with a draw each."""
    image, label, palette = _painted(n=16)
    aug = Augment(hflip=0.5, scale=(0.6, 1.6), colour=0.0)
    x, y = aug(image, label, _gen(1))
    img = x.permute(0, 2, 3, 1).round().numpy().astype(int)
    lbl = y.numpy()
    flipped = scaled = 0
    for i in range(len(lbl)):
        pad = np.pad(lbl[i].astype(np.int64), 2, constant_values=-1)
        windows = np.lib.stride_tricks.sliding_window_view(pad, (5, 5))
        inner = (windows == lbl[i][..., None, None]).all(axis=(-1, -2))
        painted = inner & (lbl[i] != IGNORE_INDEX)
        assert painted.mean() > 0.1
        diff = np.abs(img[i][painted] - palette[lbl[i][painted]].astype(int)).max()
        assert diff <= 2, (i, diff)
        assert (img[i][lbl[i] == IGNORE_INDEX] == 0).all()
        seven = (lbl[i] == 7).any(axis=0)
        flipped += bool(seven[-len(seven) // 2 :].any() and not seven[: len(seven) // 2].any())
        scaled += bool((lbl[i] == IGNORE_INDEX).any())
    assert flipped and scaled  # the draws exercised both


def test_labels_keep_their_values():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (8, 32, 64, 3), dtype=np.uint8))
    label = torch.from_numpy(rng.integers(0, 8, (8, 32, 64), dtype=np.uint8))
    label[0, :4] = IGNORE_INDEX
    x, y = Augment(hflip=0.5, scale=(0.5, 1.5), colour=0.3)(image, label, _gen(2))
    assert x.shape == (8, 3, 32, 64) and y.shape == (8, 32, 64) and y.dtype == torch.int64
    assert set(torch.unique(y).tolist()) <= set(range(8)) | {IGNORE_INDEX}
    assert float(x.min()) >= 0 and float(x.max()) <= 255


def test_colour_jitter_draws_per_frame_and_keeps_the_label():
    """Identical frames in one batch come out with different brightness/contrast; the label
    is untouched by colour."""
    image = torch.full((4, 16, 16, 3), 100, dtype=torch.uint8)
    image[:, :8] = 50
    label = torch.zeros((4, 16, 16), dtype=torch.uint8)
    x, y = Augment(hflip=0.0, scale=(1.0, 1.0), colour=0.3)(image, label, _gen(3))
    means = x.mean(dim=(1, 2, 3))
    assert len(set(means.round(decimals=3).tolist())) == 4
    assert torch.equal(y, label.long())


def test_the_same_seed_draws_the_same_augmentation():
    image, label, _ = _painted(n=4)
    aug = Augment(scale=(0.6, 1.6))
    a, b, c = (aug(image, label, _gen(s)) for s in (5, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_augment_batch_returns_normalized_model_input(test_transform):
    image, label, _ = _painted(n=2)
    batch = {"image": image, "label": label, "image_id": ["a", "b"]}
    out = augment_batch(batch, Augment(colour=0.0, hflip=0.0, scale=(1.0, 1.0)),
                        test_transform, _gen(0))  # fmt: skip
    assert out["image_id"] == ["a", "b"]
    expected = test_transform.normalize(image)
    assert out["image"].shape == (2, 3, 96, 160)
    assert torch.allclose(out["image"], expected)


@pytest.mark.parametrize("augment", [True, False])
def test_the_training_loop_augments_raw_batches_only_when_asked(
    augment, local_shards, test_transform, ray_cluster, monkeypatch
):
    """train_epoch (the adapter around engine.train_one_epoch): with --augment the frames reach the step augmented (other pixels than the
    plain normalized frames), with --no-augment exactly the normalized frames."""
    from types import SimpleNamespace

    from pipelines.data.shards import build_dataset
    from pipelines.training import engine, loop
    from pipelines.training.batches import torch_batches

    seen: dict[str, torch.Tensor] = {}

    def record_step(state, batch):
        seen.update(zip(batch["image_id"], batch["image"], strict=True))
        return torch.zeros(())

    monkeypatch.setattr(engine, "train_step", record_step)
    job = SimpleNamespace(batch_size=4, shuffle_buffer=0, augment=augment)
    me = loop.Rank(cfg=SimpleNamespace(job=job, transform=test_transform), rank=0, world=1,
                   steps_per_epoch=4)  # fmt: skip
    state = engine.TrainState(torch.nn.Conv2d(3, 8, 1), None, None, None, None)
    ds = build_dataset(local_shards, "train")
    loop.train_epoch(me, state, ds, 0, 0, None)
    plain = {
        i: x
        for b in torch_batches(ds, 4, test_transform)
        for i, x in zip(b["image_id"], b["image"], strict=True)
    }
    assert len(seen) == 16 and set(seen) <= set(plain)
    same = [torch.equal(x, plain[i]) for i, x in seen.items()]
    assert all(same) if not augment else not any(same)
