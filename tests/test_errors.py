"""One error root: every error a user can fix derives from UniDGError, and the service names the option at fault."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest

from unidg.core.errors import OptionError, UniDGError
from unidg.core.settings import UniDGSettings
from unidg.runtime.synthesizer import RequestError, SynthesisRequest, check_request_options

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "unidg/core": "unidg.core",
    "runtime": "unidg.runtime",
    "train": "unidg.train",
    "export": "unidg.export",
    "calib": "unidg.calib",
}
# Exceptions that steer control flow or wrap the program's own failures, not a user's input.
NOT_USER_ERRORS = {
    "GenerationCancelled",  # a progress callback asked to stop
    "ClientGone",  # the HTTP client disconnected
    "QueueFull",  # turned into 503 by the service
    "SynthesisTimeout",  # turned into 504 by the service
    "ServiceError",  # an HTTP answer with its status
    "AbiError",  # a C ABI status code with its message
    "AotCompileError",  # Triton could not compile the kernel: a toolchain failure with its log
    "JudgeError",  # the judge service failed after its retries
    "RewardError",  # a reward could not be computed
    "_AnswerTooLarge",  # a chat answer over its size cap: retried, then reported as the agent's own error
}


def error_classes() -> list[tuple[str, str]]:
    """(module, class) of every class named *Error or *Unavailable defined in the four packages."""
    found = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in tree.body:
                if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Unavailable", "TooLarge")):
                    relative = path.relative_to(ROOT / folder).with_suffix("")
                    module = ".".join([package, *relative.parts]).removesuffix(".__init__")
                    found.append((module, node.name))
    return found


def test_every_user_error_derives_from_the_one_root() -> None:
    classes = error_classes()
    assert len(classes) > 20
    strays = []
    for module, name in classes:
        if name in NOT_USER_ERRORS:
            continue
        if module.endswith("capi._embedding"):  # imports the cffi library it is embedded in
            continue
        try:
            cls = getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as error:  # an optional extra (fastapi, tensorrt) missing
            pytest.skip(f"{module} needs {error.name}, which is not installed")
        if not issubclass(cls, UniDGError):
            strays.append(f"{module}.{name}")
    assert not strays, f"derive these from unidg.core.errors.UniDGError: {strays}"


def test_weights_error_is_defined_once() -> None:
    definitions = [(module, name) for module, name in error_classes() if name == "WeightsError"]
    assert definitions == [("unidg.core.manifest", "WeightsError")]
    from unidg.core.manifest import WeightsError
    from unidg.core.weights_folder import WeightsError as calib_weights_error

    assert calib_weights_error is WeightsError


def test_user_errors_stay_value_errors_for_library_callers() -> None:
    assert issubclass(UniDGError, ValueError) and issubclass(OptionError, UniDGError)


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"steps": 0}, "steps"),
        ({"guidance": float("nan")}, "guidance"),
        ({"guidance": "high"}, "guidance"),
        ({"category": "no such category"}, "category"),
    ],
)
def test_request_errors_name_their_option(change: dict, option: str) -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[8:16, 8:16] = True
    request = SynthesisRequest(image, mask, image, mask, **change)
    with pytest.raises(RequestError) as caught:
        check_request_options(request, UniDGSettings())
    assert caught.value.option == option
    assert option in str(caught.value) or option == "category"
