"""Start a real ComfyUI server with the pack installed, and run API-format graphs in it.

Used by the test fixtures, `make run`, `make demo` and `make bench`. The server is the host's own
`main.py`, started as a subprocess on a free loopback port; models come from folders named in an
extra-model-paths config, and custom nodes from a private custom-nodes folder holding links to the
pack (and, for tiny models, to `devtools/tiny_host_support`).
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from devtools.paths import REPO_ROOT, host_dir, offline_env

PACK_DIR_NAME = "ComfyUI-MMIG"
TINY_SUPPORT_DIR = REPO_ROOT / "devtools" / "tiny_host_support"
# The model folders the pack registers, plus the host's own ones the workflows use.
MODEL_FOLDERS = ("checkpoints", "vae", "loras", "clip", "clip_vision", "controlnet", "upscale_models",
                 "embeddings", "blip2", "vlm", "LLM", "mmig", "diffrir")


# The host's VRAM flags, mutually exclusive with --cpu (they need a GPU).
DEVICE_FLAGS = {"--gpu-only", "--highvram", "--normalvram", "--lowvram", "--novram", "--cpu"}


class HostError(RuntimeError):
    """The host refused a graph, failed while running it, or did not start."""


@dataclass
class GraphResult:
    prompt_id: str | None
    outputs: dict = field(default_factory=dict)
    error: str | None = None
    node_errors: dict = field(default_factory=dict)
    seconds: float = 0.0
    node_seconds: dict = field(default_factory=dict)  # node id -> seconds, from run_graph_timed

    @property
    def ok(self) -> bool:
        return self.error is None

    def check(self) -> "GraphResult":
        if self.error:
            raise HostError(self.error)
        return self


def _die_with_parent() -> None:
    """In the server's process: get SIGTERM when the process that started it dies (Linux).

    A test run killed by a timeout must not leave a server behind, holding memory and a port.
    """
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: stop() and the context manager still end it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostServer:
    """A running ComfyUI server. Use as a context manager, or call start()/stop()."""

    def __init__(self, models_dirs: list[Path] | tuple = (), *, with_pack: bool = True,
                 with_tiny_support: bool = False, extra_custom_nodes: list[Path] | tuple = (),
                 work_dir: Path | None = None,
                 output_dir: Path | None = None, input_dir: Path | None = None,
                 extra_args: list[str] | None = None, start_timeout: float = 180.0):
        self.host = host_dir()
        self._tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="mmig-host-")
        self.work_dir = Path(work_dir or self._tmp.name)
        self.output_dir = Path(output_dir or self.work_dir / "output")
        self.input_dir = Path(input_dir or self.work_dir / "input")
        self.models_dirs = [Path(d) for d in models_dirs]
        self.with_pack = with_pack
        self.with_tiny_support = with_tiny_support
        self.extra_custom_nodes = [Path(p) for p in extra_custom_nodes]
        self.extra_args = list(extra_args or [])
        self.start_timeout = start_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.work_dir / "host.log"
        self.proc: subprocess.Popen | None = None

    # -- life cycle -----------------------------------------------------------------------------
    def _write_config(self) -> Path:
        custom_nodes = self.work_dir / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        links = {}
        if self.with_pack:
            links[PACK_DIR_NAME] = REPO_ROOT
        if self.with_tiny_support:
            links["mmig_tiny_host_support"] = TINY_SUPPORT_DIR
        for extra in self.extra_custom_nodes:
            links[extra.name] = extra
        for name, target in links.items():
            link = custom_nodes / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        lines = []
        for i, models in enumerate(self.models_dirs):
            lines += [f"mmig_models_{i}:", f"  base_path: {json.dumps(str(models))}"]
            lines += [f"  {folder}: {folder}/" for folder in MODEL_FOLDERS]
        lines += ["mmig_custom_nodes:", f"  custom_nodes: {json.dumps(str(custom_nodes))}"]
        config = self.work_dir / "extra_model_paths.yaml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def _user_data_args(self) -> list[str]:
        """Keep the host's per-user data (settings, its sqlite database) in the work folder.

        Newer hosts write `user/` and `user/comfyui.db` inside the ComfyUI checkout, which may be
        someone's real install, and which concurrent servers would share. Older hosts have neither
        flag; which ones this host takes is read from its argument parser's source.
        """
        cli_args = self.host / "comfy" / "cli_args.py"
        flags = cli_args.read_text(errors="replace") if cli_args.is_file() else ""
        user_dir = self.work_dir / "user"
        args = []
        if '"--user-directory"' in flags:
            user_dir.mkdir(parents=True, exist_ok=True)  # the host requires it to exist
            args += ["--user-directory", str(user_dir)]
        if '"--database-url"' in flags:
            user_dir.mkdir(parents=True, exist_ok=True)
            args += ["--database-url", f"sqlite:///{user_dir / 'comfyui.db'}"]
        return args

    def start(self) -> "HostServer":
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.input_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        # --cpu, unless a device flag of the host's (--lowvram, --novram, ...; exclusive with --cpu) is given.
        device = [] if set(self.extra_args) & DEVICE_FLAGS else ["--cpu"]
        cmd = [sys.executable, "main.py", *device, "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--extra-model-paths-config", str(config),
               "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
               "--temp-directory", str(self.work_dir), *self._user_data_args(), *self.extra_args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.host, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=offline_env(), start_new_session=True,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HostError(f"ComfyUI exited with code {self.proc.returncode} while starting:\n"
                                f"{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.3)
        self.stop()
        raise HostError(f"ComfyUI did not answer within {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "HostServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what the host said ---------------------------------------------------------------------
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def pack_import_failure(self) -> str | None:
        """The host's complaint if it failed to import the pack, else None."""
        log = self.log()
        for line in log.splitlines():
            if PACK_DIR_NAME in line and ("IMPORT FAILED" in line or "Cannot import" in line):
                return line.strip() + "\n" + log
        return None

    def pack_import_seconds(self) -> float | None:
        """The import time the host printed for the pack ("   0.1 seconds: .../ComfyUI-MMIG")."""
        match = re.search(r"([0-9.]+) seconds(?: \(IMPORT FAILED\))?: \S*" + re.escape(PACK_DIR_NAME), self.log())
        return float(match.group(1)) if match else None

    # -- HTTP -----------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict, timeout: float = 30):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=60)

    def run_graph(self, graph: dict, timeout: float = 300) -> GraphResult:
        """Submit an API-format graph to /prompt and wait for its /history entry."""
        started = time.monotonic()
        try:
            queued = self.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
        except urllib.error.HTTPError as e:
            return self._refused(json.loads(e.read() or b"{}"), str(e), time.monotonic() - started)
        prompt_id = queued["prompt_id"]
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return GraphResult(prompt_id, error=f"the host died:\n{self.log_tail()}",
                                   seconds=time.monotonic() - started)
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                return self._result(prompt_id, history[prompt_id], time.monotonic() - started)
            time.sleep(0.05)
        return GraphResult(prompt_id, error=f"no result within {timeout:.0f} s", seconds=timeout)

    def run_graph_timed(self, graph: dict, timeout: float = 600) -> GraphResult:
        """run_graph, and how long each node ran, in `node_seconds` (node id -> seconds).

        The host's /history has no timings, but its websocket sends "executing" with a node id just before
        that node runs, and with node None when the graph is done; a node's time is the gap between its
        message and the next one (received here, so a few ms of message latency are included). Cached
        nodes send nothing and are absent.
        """
        import asyncio

        import aiohttp  # a dependency of every ComfyUI host

        client_id = uuid.uuid4().hex

        async def submit_and_listen():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}") as ws:
                    started = time.monotonic()
                    async with session.post(self.url + "/prompt",
                                            json={"prompt": graph, "client_id": client_id}) as response:
                        body = await response.json(content_type=None)
                        if response.status != 200:
                            return self._refused(body, f"HTTP {response.status}", time.monotonic() - started)
                    prompt_id, seconds, current, since = body["prompt_id"], {}, None, 0.0
                    while True:
                        message = await ws.receive(timeout=max(1.0, started + timeout - time.monotonic()))
                        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                            aiohttp.WSMsgType.ERROR):
                            return GraphResult(prompt_id, error=f"the host closed the websocket:\n{self.log_tail()}")
                        if message.type != aiohttp.WSMsgType.TEXT:
                            continue  # binary previews
                        event = json.loads(message.data)
                        data = event.get("data") or {}
                        if event.get("type") != "executing" or data.get("prompt_id", prompt_id) != prompt_id:
                            continue
                        now = time.monotonic()
                        if current is not None:
                            seconds[current] = seconds.get(current, 0.0) + now - since
                        current, since = data.get("node"), now
                        if current is None:
                            break
                    history = self.get(f"/history/{prompt_id}")
                    result = self._result(prompt_id, history.get(prompt_id, {}), time.monotonic() - started)
                    result.node_seconds = seconds
                    return result

        try:
            return asyncio.run(submit_and_listen())
        except asyncio.TimeoutError:
            return GraphResult(None, error=f"no result within {timeout:.0f} s", seconds=timeout)

    @staticmethod
    def _refused(body: dict, fallback: str, seconds: float) -> GraphResult:
        err = body.get("error", {})
        message = err.get("message", fallback) if isinstance(err, dict) else str(err)
        details = err.get("details", "") if isinstance(err, dict) else ""
        node_errors = body.get("node_errors", {})
        text = "; ".join(f"{message}: {details}".strip(": ").split("\n"))
        for node_id, info in node_errors.items():
            for e_ in info.get("errors", []):
                text += f"\n  node {node_id} ({info.get('class_type')}): {e_.get('message')}: {e_.get('details')}"
        return GraphResult(None, error=f"the host refused the graph: {text}", node_errors=node_errors, seconds=seconds)

    @staticmethod
    def _result(prompt_id: str, entry: dict, seconds: float) -> GraphResult:
        status = entry.get("status", {})
        if status.get("status_str") == "error" or not status.get("completed", True):
            message = "the graph failed"
            for kind, data in status.get("messages", []):
                if kind == "execution_error":
                    message = (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                               f"{data.get('exception_type')}: {data.get('exception_message')}")
                elif kind == "execution_interrupted":
                    message = f"the graph was interrupted at node {data.get('node_id')}"
            return GraphResult(prompt_id, outputs=entry.get("outputs", {}), error=message, seconds=seconds)
        return GraphResult(prompt_id, outputs=entry.get("outputs", {}), seconds=seconds)

    def output_files(self, result: GraphResult) -> list[Path]:
        """Paths of every file the graph's output nodes reported (images, texts)."""
        files = []
        for node_output in result.outputs.values():
            for items in node_output.values():
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item and item.get("type", "output") == "output":
                        files.append(self.output_dir / item.get("subfolder", "") / item["filename"])
        return files
