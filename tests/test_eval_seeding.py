"""Every detector of the benchmark starts from weights fixed by its seed alone, whatever ran before in the process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unidg.train.evaluation import detector_training as dt
from unidg.train.evaluation.config import DetectorConfig
from unidg.train.evaluation.training_sets import LabelledSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data() -> LabelledSet:
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 16, 16), bool)
    masks[1, 4:9, 5:10] = masks[3, 2:6, 8:14] = True
    return LabelledSet((rng.random((4, 16, 16, 3)) * 255).astype(np.uint8), masks, ["good", "a", "good", "b"])


def _state(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def _trained_twice(train) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The same seeded training after two different histories of torch's global generator."""
    torch.manual_seed(123)
    first = _state(train())
    torch.manual_seed(456)
    torch.rand(1000)  # an earlier model, a shuffle, anything that draws
    second = _state(train())
    return first, second


CFG = DetectorConfig(size=16, batch=4, unet_width=4, unet_depth=2, resnet_width=4)


@pytest.mark.parametrize("kind", ["binary_unet", "classifier", "multiclass_unet", "multitask"])
def test_same_seed_same_detector_whatever_ran_before(kind: str) -> None:
    data = _data()
    train = {
        "binary_unet": lambda: dt.train_binary_unet(data, CFG, seed=7, epochs=1),
        "classifier": lambda: dt.train_classifier(data, ["a", "b", "good"], CFG, seed=7, epochs=1),
        "multiclass_unet": lambda: dt.train_multiclass_unet(data, ["background", "a", "b"], CFG, seed=7, epochs=1),
        "multitask": lambda: dt.train_multitask(data, ["a", "b"], CFG, seed=7, epochs=1),
    }[kind]
    first, second = _trained_twice(train)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_new_head_on_a_pretrained_model_is_seeded_too() -> None:
    data = _data()
    anomaly = LabelledSet(data.images, data.masks, ["good", "anomaly", "good", "anomaly"])
    pretrained = dt.train_classifier(anomaly, ["good", "anomaly"], CFG, seed=3, epochs=1)
    state = pretrained.state_dict()

    def finetune():
        model = dt.ResNet34(2, CFG.resnet_width)
        model.load_state_dict(state)
        return dt.train_classifier(data, ["a", "b", "good"], CFG, seed=7, epochs=1, model=model)

    first, second = _trained_twice(finetune)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_different_seeds_give_different_detectors() -> None:
    data = _data()
    one = _state(dt.train_binary_unet(data, CFG, seed=1, epochs=1))
    two = _state(dt.train_binary_unet(data, CFG, seed=2, epochs=1))
    assert any(not torch.equal(a, b) for a, b in zip(one, two))


def test_category_consistency_trains_its_classifier_and_scores_each_generated_image() -> None:
    data = _data()
    references = data.subset([1, 3])
    generated = LabelledSet(data.images, data.masks, ["a", "b", "a", "c"])
    scores = dt.category_consistency(references, references, CFG, seed=0)
    assert np.isfinite(scores).all() and ((0 < scores) & (scores < 1)).all()
    scores = dt.category_consistency(generated, references, CFG, seed=0)
    assert np.isfinite(scores[:3]).all() and np.isnan(scores[3])  # "c": no reference of that type
    np.testing.assert_array_equal(scores, dt.category_consistency(generated, references, CFG, seed=0), strict=False)
