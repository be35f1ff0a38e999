"""Horovod over Gloo on the launcher's barrier tasks, without horovodrun, ssh or MPI.

What Horovod's own gloo launcher does (``horovod.runner.gloo_run``), done by this launcher: the
driver runs the run's rendezvous (the key-value store the ranks' Gloo contexts meet through; ours,
``rendezvous.RendezvousServer``, which serves only the run's ranks, rather than Horovod's, which
serves anyone); every barrier task already knows every rank's host from ``BarrierTaskContext``, so
it computes the rank, local and cross ranks the way Horovod's host assignment does and puts them,
with the network interface that carries its host's address, into the rank process's environment.
Before the user's function runs, the rank's process starts its signing proxy to the driver's store
on loopback and points Gloo at it. ``hvd.init()`` in the user's function
(``import horovod.tensorflow.keras as hvd``) then just works.

Horovod 0.28.1, its last release, builds only against TensorFlow <= 2.15: this backend runs in
the environment ``scripts/make_horovod_env.sh`` builds (README, "Backends").
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sparkml_mnist.launcher import keras_flavour
from sparkml_mnist.launcher.backends import rendezvous
from sparkml_mnist.launcher.backends.base import (
    FULL_PRECISION,
    HALF_PRECISION,
    DatasetMaker,
    DriverBackend,
    RankBackend,
)
from sparkml_mnist.launcher.spec import RankSpec, local_ranks
from sparkml_mnist.errors import ConfigError, LaunchError

NAME = "horovod"
HOROVOD_TF_MODULE = "horovod.tensorflow"
SHUTDOWN_WAIT_S = 3.0
TF_EXTENSION_GLOB = "mpi_lib*.so"  # Horovod's TensorFlow ops, present only when built with TensorFlow
RENDEZVOUS_PORT = "rendezvous_port"
RENDEZVOUS_ADDR_ENV = "HOROVOD_GLOO_RENDEZVOUS_ADDR"
RENDEZVOUS_PORT_ENV = "HOROVOD_GLOO_RENDEZVOUS_PORT"  # set in the rank's process, once its proxy listens
IFACE_ENV = "HOROVOD_GLOO_IFACE"
INSTALL_HINT = (
    "Horovod 0.28.1 builds only against TensorFlow <= 2.15, so it has its own environment: run "
    "`bash scripts/make_horovod_env.sh` (TF 2.15 + Horovod with Gloo, ~6 minutes the first time) and start "
    "the job with that environment's python (README, 'Backends'); or use the default backend 'tf'"
)
CHIEF_RANK = 0
SIOCGIFADDR = 0x8915  # <linux/sockios.h>: get an interface's IPv4 address
IFNAMSIZ = 15  # <net/if.h>: longest interface name (16 with its NUL)


@dataclass(frozen=True)
class HorovodSlot:
    """Where a rank sits, in Horovod's terms (``horovod.runner.common.util.hosts.SlotInfo``)."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int


def horovod_slot(hosts: list[str], rank: int) -> HorovodSlot:
    """Rank, local and cross ranks for ``rank`` given every rank's host, in rank order.

    Local rank: position among the ranks on the same host. Cross rank: position of this host
    among the hosts that have a rank with the same local rank (Horovod's hierarchical groups).
    """
    host = hosts[rank]
    local_rank, local_size = local_ranks(hosts, rank)
    hosts_in_order = list(dict.fromkeys(hosts))
    with_local_rank = [
        h for h in hosts_in_order if sum(1 for other_host in hosts if other_host == h) > local_rank
    ]
    return HorovodSlot(
        rank=rank, size=len(hosts), local_rank=local_rank, local_size=local_size,
        cross_rank=with_local_rank.index(host), cross_size=len(with_local_rank),
    )


def interface_addresses() -> dict[str, str]:
    """Each network interface of this machine and its (primary) IPv4 address; Linux, standard library only."""
    import fcntl  # noqa: PLC0415 - Linux/Unix only, like Gloo's TCP transport

    found = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:IFNAMSIZ])
            try:
                reply = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, request)
            except OSError:  # the interface has no IPv4 address
                continue
            found[name] = socket.inet_ntoa(reply[20:24])
    return found


def interface_for(host: str) -> str | None:
    """The network interface that holds ``host``'s IPv4 address on this machine (None: none does)."""
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return None
    return next((name for name, mine in interface_addresses().items() if mine == address), None)


def horovod_problem() -> str | None:
    """Why Horovod's TensorFlow API cannot be used in this environment (None: it can).

    Looks at files only: importing ``horovod.tensorflow`` would import TensorFlow (seconds).
    """
    spec = importlib.util.find_spec("horovod")
    if spec is None or not spec.submodule_search_locations:
        return "Horovod is not installed"
    package = Path(next(iter(spec.submodule_search_locations)))
    if not list((package / "tensorflow").glob(TF_EXTENSION_GLOB)):
        return f"Horovod at {package} was built without TensorFlow support (HOROVOD_WITH_TENSORFLOW=1)"
    if not keras_flavour.builtin_keras_2(keras_flavour.installed_tensorflow() or "0.0"):
        return (
            f"TensorFlow is {keras_flavour.installed_tensorflow()}: Horovod 0.28.1 works only with TensorFlow <= 2.15 "
            "(its Keras API picks up Keras 3 on later ones)"
        )
    return None


class HorovodDriverBackend(DriverBackend):
    name = NAME

    def check_available(self, where: str) -> None:
        problem = horovod_problem()
        if problem is not None:
            error = ConfigError if where == "driver" else LaunchError
            raise error(f"backend 'horovod' was asked for, but on the {where} {problem}. {INSTALL_HINT}")

    @contextlib.contextmanager
    def driver_session(self, size: int, bind_host: str, secret: str) -> Iterator[dict[str, Any]]:
        """The run's rendezvous store, bound to the driver's address, answering only the run's ranks.

        Not Horovod's ``RendezvousHTTPServer``: that one lets anyone overwrite the peers' addresses and can
        be held open by one slow client. Ours checks each request's signature (a key per rank, from the
        run's ``secret``), bounds bodies, connections and the time a request may take, and closing it
        waits for nothing (``rendezvous`` module).
        """
        with rendezvous.RendezvousServer(bind_host, size, secret) as server:
            yield {RENDEZVOUS_PORT: server.port}

    def environment(self, spec: RankSpec) -> dict[str, str]:
        port = spec.backend_options.get(RENDEZVOUS_PORT)
        if port is None:
            raise LaunchError("the Horovod backend needs the driver's rendezvous server; none was started")
        hosts = [address.rsplit(":", 1)[0] for address in spec.addresses]
        place = horovod_slot(hosts, spec.rank)
        iface = os.environ.get(IFACE_ENV) or interface_for(spec.host)
        if not iface:
            raise LaunchError(
                f"rank {spec.rank}: no network interface on this machine holds the address of {spec.host!r} "
                f"(the host Spark reports for this task); set {IFACE_ENV} in the executors' environment "
                "(spark.executorEnv.HOROVOD_GLOO_IFACE) to the interface the ranks should talk over"
            )
        env = {
            **keras_flavour.legacy_keras_environment(),
            RENDEZVOUS_ADDR_ENV: rendezvous.LOOPBACK,  # the rank's own proxy; its port once it listens (start)
            "HOROVOD_CONTROLLER": "gloo",
            "HOROVOD_CPU_OPERATIONS": "gloo",
            IFACE_ENV: iface,
            "HOROVOD_HOSTNAME": spec.host,
            "HOROVOD_RANK": str(place.rank),
            "HOROVOD_SIZE": str(place.size),
            "HOROVOD_LOCAL_RANK": str(place.local_rank),
            "HOROVOD_LOCAL_SIZE": str(place.local_size),
            "HOROVOD_CROSS_RANK": str(place.cross_rank),
            "HOROVOD_CROSS_SIZE": str(place.cross_size),
        }
        if spec.policy.collective_limit_s:  # Gloo's rendezvous and every collective then time out
            env["HOROVOD_GLOO_TIMEOUT_SECONDS"] = str(max(1, int(spec.policy.collective_limit_s)))
        return env


class HorovodRankBackend(RankBackend):
    """Inside the rank: ``horovod.tensorflow.keras``, initialised once, checked against the spec."""

    def __init__(self, spec: RankSpec) -> None:
        super().__init__(spec)
        self._hvd: Any = None
        self._proxy: rendezvous.RendezvousProxy | None = None

    def start(self) -> None:
        """Start this rank's rendezvous proxy and point Gloo at it, before the function can call ``hvd.init()``.

        Gloo's client sends no credentials; the proxy, in this process, signs its requests with the rank's
        key (from the rank's channel token) for the driver's store.
        """
        port = self.spec.backend_options.get(RENDEZVOUS_PORT)
        if port is None:
            raise LaunchError("the Horovod backend needs the driver's rendezvous server; none was started")
        self._proxy = rendezvous.RendezvousProxy(
            self.spec.launch.driver_host, int(port), self.spec.rank, self.spec.channel_token,
        )
        self._proxy.start()
        os.environ[RENDEZVOUS_ADDR_ENV] = self._proxy.host
        os.environ[RENDEZVOUS_PORT_ENV] = str(self._proxy.port)

    @property
    def hvd(self) -> Any:
        if self._hvd is None:
            keras_flavour.tensorflow()  # the launcher checked Horovod on this host before starting the rank
            import horovod.tensorflow.keras as hvd  # noqa: PLC0415 - only in Horovod's environment

            hvd.init()
            if (hvd.rank(), hvd.size()) != (self.spec.rank, self.spec.size):
                raise LaunchError(
                    f"Horovod says rank {hvd.rank()} of {hvd.size()}, the launcher rank {self.spec.rank} of "
                    f"{self.spec.size}"
                )
            self._hvd = hvd
        return self._hvd

    def make_strategy(self) -> Any:
        """Horovod all-reduces in its optimizer; the model itself lives in TF's default strategy."""
        self.hvd  # noqa: B018 - initialise Horovod first
        return keras_flavour.tensorflow().distribute.get_strategy()

    def model_scope(self) -> contextlib.AbstractContextManager[Any]:
        self.hvd  # noqa: B018
        return contextlib.nullcontext()

    def wrap_optimizer(self, optimizer: Any, allreduce: str = FULL_PRECISION) -> Any:
        hvd = self.hvd
        compression = hvd.Compression.fp16 if allreduce == HALF_PRECISION else hvd.Compression.none
        return hvd.DistributedOptimizer(optimizer, compression=compression)

    def fit_callbacks(self) -> list[Any]:
        return [
            self.hvd.callbacks.BroadcastGlobalVariablesCallback(CHIEF_RANK),  # every rank starts from rank 0's weights
            self.hvd.callbacks.MetricAverageCallback(),  # epoch metrics (train and validation) averaged over ranks
        ]

    def distribute(self, make_dataset: DatasetMaker, global_batch_size: int) -> Any:
        """Horovod needs no distribution: each rank's own pipeline of ``B / size`` rows a step is its input."""
        self.hvd  # noqa: B018
        return make_dataset(global_batch_size // self.spec.size, 1)

    def shutdown(self) -> None:
        """Shut Horovod down on every rank together, so no rank's Gloo loop sees its peer vanish.

        Also when the user's function called ``hvd.init()`` itself (HorovodRunner style).
        """
        hvd = sys.modules.get(HOROVOD_TF_MODULE)
        if hvd is not None and hvd.is_initialized():
            done = threading.Thread(target=hvd.shutdown, daemon=True)
            done.start()
            done.join(SHUTDOWN_WAIT_S)  # the parent kills the process anyway if this does not return
        if self._proxy is not None:
            self._proxy.close()
