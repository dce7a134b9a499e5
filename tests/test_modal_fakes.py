"""The tests' fakes of modal's objects are held to the installed modal, so that a modal upgrade that changes a
method or what it raises fails here instead of in a user's run (issue 29: the fakes raised NotFoundError for a
missing file, modal 1.6.4 raises FileNotFoundError, and `status` crashed on every fresh volume).

Two checks per fake: its methods have the names and parameters of modal's own (`inspect.signature`), and modal's
own method, called offline with only the network replaced (a client whose RPCs fail with the status the server
sends), raises what the fake raises.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import subprocess
import sys

import pytest

modal = pytest.importorskip("modal")
from grpclib import GRPCError, Status  # noqa: E402
from modal._grpc_client import grpc_error_converter  # noqa: E402
from modal._utils.async_utils import synchronizer  # noqa: E402
from modal.volume import _Volume  # noqa: E402
from modal_proto import api_pb2  # noqa: E402

from backends import modal_image as mi  # noqa: E402
from backends import modal_ops as mo  # noqa: E402
from backends import modal_plan as mp  # noqa: E402
from test_modal_backend import FakeCall, FakeFunction, FakeSecret, FakeUpload, FakeVolume  # noqa: E402

FAKES = [
    (FakeVolume, modal.Volume, ["read_file", "read_file_into_fileobj", "listdir", "batch_upload", "commit", "reload"]),
    (FakeUpload, modal.volume.VolumeUploadContextManager2, ["put_file", "put_directory"]),
    (FakeUpload, modal.volume.VolumeUploadContextManager, ["put_file", "put_directory"]),  # v1 volumes
    (FakeFunction, modal.Function, ["with_options", "spawn", "remote"]),
    (FakeCall, modal.FunctionCall, ["get"]),
    (FakeSecret, modal.Secret, ["from_name", "hydrate"]),
]


def _parameters(function):
    return {name: p for name, p in inspect.signature(function).parameters.items() if name != "self"}


@pytest.mark.parametrize("fake, real, methods", FAKES, ids=[f"{f.__name__}-{r.__name__}" for f, r, _ in FAKES])
def test_every_fake_method_has_modals_name_and_parameters(fake, real, methods):
    for method in methods:
        ours, theirs = _parameters(getattr(fake, method)), _parameters(getattr(real, method))
        for name, parameter in ours.items():
            assert name in theirs, f"{fake.__name__}.{method}({name}): modal's {real.__name__}.{method} has no {name}"
            assert parameter.kind == theirs[name].kind, f"{fake.__name__}.{method}({name}) is passed another way"
            if parameter.default is not inspect.Parameter.empty:
                assert parameter.default == theirs[name].default, f"{fake.__name__}.{method}({name}) default"
        required = [n for n, p in theirs.items() if p.default is inspect.Parameter.empty
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert set(required) <= set(ours), f"{fake.__name__}.{method} lacks modal's {set(required) - set(ours)}"


def test_the_call_fake_has_an_object_id_and_app_run_takes_detach():
    assert isinstance(inspect.getattr_static(modal.FunctionCall, "object_id"), property)
    assert "detach" in _parameters(modal.App.run) and _parameters(modal.App.run)["detach"].kind.name == "KEYWORD_ONLY"


def test_the_cluster_context_the_node_tests_build_is_modals():
    info = modal.experimental.get_cluster_info
    assert inspect.signature(info).return_annotation in ("ClusterInfo", modal.experimental.ClusterInfo)
    assert {"rank", "container_ips", "container_ipv4_ips"} <= {f.name for f in
                                                               dataclasses.fields(modal.experimental.ClusterInfo)}


# -- what modal's own methods raise, offline -----------------------------------------------------------


class _Rpc:
    """A method of the client's stub that fails as the server does: grpclib's error, converted by modal's own code."""

    def __init__(self, status: Status, message: str):
        self.status, self.message = status, message

    def _fail(self):
        with grpc_error_converter():
            raise GRPCError(self.status, self.message)

    async def __call__(self, request, **kwargs):
        self._fail()

    async def unary_stream(self, request, metadata=None):
        self._fail()
        yield


class _Client:
    """In place of modal's client: every RPC fails with ``status`` (NOT_FOUND: the file, directory or secret does
    not exist). No network, no credentials."""

    _snapshotted = False

    def __init__(self, status: Status = Status.NOT_FOUND, message: str = "No such file or directory"):
        self._stub = type("Stub", (), {"__getattr__": lambda _, name: _Rpc(status, message)})()


def _volume(client: _Client) -> modal.Volume:
    return synchronizer._translate_out(_Volume._new_hydrated("vo-test", client, api_pb2.VolumeMetadata(version=2)))


def _raised(call) -> type[BaseException] | None:
    try:
        call()
    except BaseException as error:  # noqa: BLE001 - the type is the point
        return type(error)
    return None


def test_a_missing_file_or_directory_raises_the_same_from_modal_and_from_the_fake():
    real, fake = _volume(_Client()), FakeVolume({})
    for name, call in [("read_file", lambda v: b"".join(v.read_file("state.json"))),
                       ("read_file_into_fileobj", lambda v: v.read_file_into_fileobj("state.json", io.BytesIO())),
                       ("listdir", lambda v: v.listdir("runs")),
                       ("listdir recursive", lambda v: v.listdir("solver_iter1_hf", recursive=True))]:
        assert _raised(lambda: call(real)) is _raised(lambda: call(fake)), name
    assert _raised(lambda: b"".join(real.read_file("x"))) is FileNotFoundError          # what issue 29 found
    assert _raised(lambda: real.listdir("x")) is modal.exception.NotFoundError
    assert all(isinstance(error(), Exception) for error in mo.MISSING) and set(mo.MISSING) == {
        FileNotFoundError, modal.exception.NotFoundError}   # what the backend catches


def test_a_missing_file_is_found_missing_before_a_byte_is_written():
    """Why download-checkpoints may write into a partial file: modal looks the file up first."""
    for volume in (_volume(_Client()), FakeVolume({})):
        target = io.BytesIO()
        assert _raised(lambda: volume.read_file_into_fileobj("state.json", target)) is FileNotFoundError
        assert target.getvalue() == b""


def test_a_missing_secret_raises_not_found_from_modal_and_from_the_fake_and_one_sentence_from_us():
    client = _Client(message="Secret 'wandb-secret' not found in environment 'main'")
    real = modal.Secret.from_name("wandb-secret", required_keys=["WANDB_API_KEY"])
    FakeSecret.missing = {"wandb-secret"}
    try:
        fake = FakeSecret.from_name("wandb-secret", required_keys=["WANDB_API_KEY"])
        assert _raised(lambda: real.hydrate(client=client)) is _raised(fake.hydrate) is modal.exception.NotFoundError
    finally:
        FakeSecret.missing = set()
    with pytest.raises(mi.MissingSecret) as missing:   # modal's own Secret code, then ours
        mi.lookup_secret(mi.W_AND_B, client=client)
    assert str(missing.value).startswith("Modal has no secret 'wandb-secret' holding WANDB_API_KEY in this workspace "
                                         "(Secret 'wandb-secret' not found in environment 'main'): create it with "
                                         "`modal secret create wandb-secret WANDB_API_KEY=<your W&B key>`")


def test_the_logs_options_are_modals():
    """What `modal app logs` reads by default, the most it tails, how far back it reads, the durations it takes."""
    from modal import _logs
    from modal._utils.time_utils import parse_duration
    from modal.cli import _logs as cli_logs

    assert cli_logs._DEFAULT_LOGS_TAIL == 100  # why logs without --since pass a window (issue 29, item 3)
    assert mo.MAX_TAIL == _logs._FETCH_LIMIT and mo.MAX_SINCE == _logs._MAX_FETCH_RANGE
    for since in ("2h", "30m", "1d", "90s", "2.5h", "1w", "h", "2H", " 2h", "-2h"):
        try:
            parse_duration(since)
            theirs = True
        except ValueError:
            theirs = False
        assert bool(mo.SINCE.match(since)) == theirs, since


def test_modal_refuses_follow_with_since_itself(tmp_path):
    done = subprocess.run([sys.executable, "-m", "modal", "app", "logs", "ap-test", "--since", "2h", "-f"],
                          capture_output=True, text=True, timeout=60, env={"HOME": str(tmp_path), "PATH": ""})
    assert done.returncode == 2 and "--follow cannot be combined with --since" in done.stderr


def test_a_cluster_takes_every_gpu_of_its_host_as_modal_says():
    assert "must request all GPUs on its host" in " ".join(modal.clustered.__doc__.split())
    assert mp.GPUS_PER_HOST == 8


def test_a_cancelled_input_is_a_base_exception_raised_on_sigusr1():
    """What backends/modal_container.py stops on: modal raises InputCancellation (not an Exception, so no `except
    Exception` swallows it) from a SIGUSR1 handler in a sync Function's main thread."""
    import modal._container_entrypoint as entrypoint

    assert not issubclass(modal.exception.InputCancellation, Exception)
    source = inspect.getsource(entrypoint.call_function)
    assert "signal.SIGUSR1" in source and "raise InputCancellation" in source
