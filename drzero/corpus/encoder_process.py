"""The embedder in a process of its own: what ``drzero ingest`` encodes with on a GPU.

    encoder = EncoderProcess(spec, device="cuda")   # returns once the model is loaded in the child
    vectors = encoder.encode_passages(texts)         # as Embedder.encode_passages
    encoder.close()

Why a process: ingest's writer holds Python's GIL for long stretches (Chroma's upsert does not release it: ~0.3 s
for 256 e5-sized vectors on a 2-core VM), while an encoder on a GPU needs the GIL in short bursts between waits on
the device (tokenizer glue, kernel launches). On one interpreter they take turns: a GPU-shaped stand-in for the
encoder (549 passages a second in batches of 256, as e5-large-v2 on an H100; 20-80 % of each batch in Python)
ran 1.1-1.6x slower beside the real writer than alone. In a process of its own the encoder runs as the bare
encoder does, and the parent's threads read, split, count tokens and write beside it.
One such process per GPU is also how every GPU of a node would embed.

The child is ``python -m drzero.corpus.encoder_process``, not a multiprocessing child: that would import the
parent's ``__main__`` script again, and run it where it has no ``if __name__ == "__main__"``. It loads the model
(its errors come back to the parent as they were raised: a missing model is still ``ModelNotFound``), then
answers one batch at a time. It dies with its parent: it waits on a socket that the parent's death closes, even a
``kill -9``. It sits in a process group of its own, so Ctrl-C reaches only the parent, which decides what to
finish (what was encoded is still written).
"""

from __future__ import annotations

import copy
import os
import pickle
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import Callable

import numpy as np

from drzero.corpus.embedder import Embedder, EmbedderSpec, count_tokens
from drzero.gpus import visible_gpu_count

def encoder_devices(device: str, processes: int) -> list[str]:
    """The device of each of ``processes`` encoder processes (0: one per visible GPU on cuda, one on the CPU):
    GPUs in turn, ``cuda:0``, ``cuda:1``, ..., several processes sharing a card when there are more than GPUs."""
    if device != "cuda":
        return [device] * max(1, processes)
    gpus = visible_gpu_count()
    count = processes or max(1, gpus)
    if gpus <= 1:
        return ["cuda"] * count
    return [f"cuda:{k % gpus}" for k in range(count)]


class EncoderStopped(RuntimeError):
    """The encoder's process is gone (killed, or out of memory); what was written so far is kept."""


class EncoderProcess:
    """``Embedder``'s ``encode_passages``, ``token_counter``, ``dimension``, ``max_tokens`` and ``spec``, with
    the model in a child process."""

    def __init__(self, spec: EmbedderSpec, device: str = "cuda", precision: str = "auto"):
        # The device is checked in the child (by Embedder): checked here too, it would cost an import of torch
        # in this process, seconds before the child could start.
        self.spec, self.device = spec, device
        ours, theirs = socket.socketpair()
        # the child finds drzero where this process found it (a checkout put first on sys.path, say)
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            self._process = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno())],
                                             pass_fds=[theirs.fileno()], env=environment, process_group=0)
        finally:
            theirs.close()  # the child's end lives in the child only: its death is then EOF here
        self._connection = Connection(ours.detach())
        self._waiting = True
        try:
            self._connection.send((spec, device, precision))
            self.dimension, self.max_tokens, self._tokenizer = self._answer()
        except BaseException:
            self.close()
            raise

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        self._waiting = True
        try:
            self._connection.send(texts)
        except OSError:
            pass  # the child is gone: the answer says how
        return self._answer()

    def token_counter(self) -> Callable[[list[str]], list[int]]:
        tokenizer = copy.deepcopy(self._tokenizer)
        return lambda texts: count_tokens(tokenizer, texts)

    def _answer(self):
        try:
            failed, value = self._connection.recv()
        except (EOFError, OSError):
            try:
                code = self._process.wait(5)
            except subprocess.TimeoutExpired:
                code = "unknown (it closed its end of the socket but still runs)"
            raise EncoderStopped(
                f"the encoder's process ({self.spec.name} on {self.device}) stopped with exit code {code} "
                f"(-9: killed, often for lack of memory); passages written so far are kept, so running the same "
                f"ingest again goes on from there.") from None
        self._waiting = False
        if failed:
            raise value
        return value

    def close(self) -> None:
        """Stop the child: an idle one is told to exit, and does so on its own (seconds of interpreter teardown
        this process need not wait for); a busy one is killed (its answer is no longer wanted)."""
        if self._process.poll() is None and not self._waiting:
            try:
                self._connection.send(None)
            except OSError:
                pass
        elif self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._connection.close()

    def __enter__(self) -> "EncoderProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve(connection: Connection) -> None:
    """The child: load the model, then encode each list of texts received, until None or the parent is gone."""
    try:
        spec, device, precision = connection.recv()
    except (EOFError, OSError):
        return  # the parent is gone
    try:
        embedder = Embedder(spec, device=device, precision=precision)
    except BaseException as error:  # noqa: BLE001 - raised again in the parent
        _send_error(connection, error)
        return
    try:
        connection.send((False, (embedder.dimension, embedder.max_tokens, embedder.model.tokenizer)))
    except OSError:
        return
    while True:
        try:
            texts = connection.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if texts is None:
            return
        try:
            vectors = embedder.encode_passages(texts)
        except BaseException as error:  # noqa: BLE001 - raised again in the parent
            _send_error(connection, error)
            continue
        try:
            connection.send((False, vectors))
        except OSError:
            return


def _send_error(connection, error: BaseException) -> None:
    try:
        pickle.loads(pickle.dumps(error))  # an exception that does not survive the pipe goes as its words
    except Exception:  # noqa: BLE001 - any failure to pickle or unpickle
        error = RuntimeError(f"{type(error).__name__}: {error}")
    try:
        connection.send((True, error))
    except OSError:
        pass


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
