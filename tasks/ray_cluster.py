"""`backend: ray`: the Ray cluster a run uses, joined once per process and checked before any model work.

The Ray glue lives here (and in infra/), never in minitron/: a Ray worker imports only minitron and runs the same
worker function that torchrun runs, with the same serialised settings.

Which cluster (`ray_address`):
  host:port, ray://host:port   that cluster's head (its GCS, or its Ray Client server);
  empty                        $RAY_ADDRESS (`minitron stack up --ray` prints it), else a new local cluster for this
                               process, which ends with it.
Token authentication is always on (RAY_AUTH_MODE=token): joining a cluster needs its token in RAY_AUTH_TOKEN (or in
the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, where Ray also looks); a local cluster started here gets
a fresh random token that lives only in this process's environment, which its workers inherit.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

from minitron.config import CompressConfig
from minitron.errors import UserError

AUTH_MODE = "token"


def resolve_address(configured: str | None) -> str | None:
    """The head to join, or None: start a local cluster."""
    return configured or os.environ.get("RAY_ADDRESS") or None


def _have_token() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or bool(path and Path(path).is_file()) or \
        (Path.home() / ".ray" / "auth_token").is_file()


def _answers(address: str, timeout: float = 5.0) -> bool:
    """A TCP connect to the head: ray.init waits minutes on an address where nothing listens."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def connect(configured: str | None) -> dict[str, float]:
    """Join (or start) the run's cluster, once per process; → its total resources (CPU, GPU, memory, ...)."""
    mode = os.environ.get("RAY_AUTH_MODE", AUTH_MODE)
    if mode != AUTH_MODE:
        raise UserError(f"RAY_AUTH_MODE is '{mode}': backend ray runs only with Ray's token authentication; unset "
                        "it or set RAY_AUTH_MODE=token")
    os.environ["RAY_AUTH_MODE"] = AUTH_MODE  # for us and our children
    address = resolve_address(configured)
    import ray
    from ray._raylet import AuthenticationTokenLoader, Config

    if not ray.is_initialized():
        if address is None:
            os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))  # else Ray writes ~/.ray/auth_token
        elif not _have_token():
            raise UserError(f"no token for the Ray cluster at {address}: set RAY_AUTH_TOKEN to its token "
                            "(`minitron stack up --ray` keeps it in its .env)")
        elif not _answers(address):
            raise UserError(f"nothing answers at {address}: check ray_address / RAY_ADDRESS and that the Ray head "
                            "is up (`minitron stack status`)")
        # Ray reads the mode and the token once per process: re-read them (as Ray's own token set-up does) in case
        # Ray was imported before they were set
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
        local = {} if address else {"include_dashboard": True, "dashboard_host": "127.0.0.1"}  # for the state API
        try:
            ray.init(address=address or "local", log_to_driver=False, **local)
        except ConnectionError:  # the head answers TCP but not us: Ray retries for ~20 s, then gives up
            raise UserError(f"the Ray cluster at {address} refused this process: check that RAY_AUTH_TOKEN is that "
                            "cluster's token") from None
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def uses_gpus(config: CompressConfig, resources: dict[str, float]) -> bool:
    """Ray Train and task workers take GPUs with device cuda, or auto on a cluster that has any; else CPUs (gloo)."""
    return config.device == "cuda" or (config.device == "auto" and resources.get("GPU", 0) > 0)


# Ray's accelerator types (resources "accelerator_type:<type>", detected on each GPU node) → the planner's cards.
# Ray names the 40 and 80 GB A100 alike: the smaller is assumed, so a stage never gets fewer GPUs than it needs.
RAY_GPU_TYPES = {"H100": "h100-80gb", "H200": "h200-141gb", "A100-80G": "a100-80gb", "A100-40G": "a100-40gb",
                 "A100": "a100-40gb", "L40S": "l40s-48gb"}


def cluster_gpu(config: CompressConfig, resources: dict[str, float]):
    """The GPU the planner sizes training stages for on this cluster (`minitron.plan.GPU`): its smallest card of the
    planner's table; the reference card where Ray reports none of them; None on a CPU cluster (CPU workers)."""
    from minitron.cost import GPUS, REFERENCE_GPU

    if not uses_gpus(config, resources):
        return None
    cards = [GPUS[RAY_GPU_TYPES[k.split(":", 1)[1]]] for k in resources
             if k.startswith("accelerator_type:") and k.split(":", 1)[1] in RAY_GPU_TYPES]
    return min(cards, key=lambda g: g.memory) if cards else GPUS[REFERENCE_GPU]


def alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def check_capacity(config: CompressConfig, resources: dict[str, float], needs: dict[str, int], where: str) -> None:
    """One line if the cluster cannot hold the largest stage: `needs` maps a stage to the workers (GPUs, or CPUs on
    a CPU cluster) it runs on at once."""
    if not needs:
        return
    unit = "GPU" if uses_gpus(config, resources) else "CPU"
    have = int(resources.get(unit, 0))
    stage, need = max(needs.items(), key=lambda kv: kv[1])
    if need > have:
        fix = ("add GPU nodes to the cluster" if unit == "GPU" else "add nodes or CPUs to the cluster") + \
            " or lower nproc" + (" (or use device: cpu)" if config.device == "cuda" and have == 0 else "")
        raise UserError(f"the Ray cluster at {where} has {have} {unit}s but {stage} needs {need}: {fix}")


def check_cluster(config: CompressConfig, needs) -> dict[str, float]:
    """Preflight under backend ray: the cluster answers, takes our token and holds the run. `needs(gpu)`: the
    workers each training stage runs on when sized for the cluster's GPU (`cluster_gpu`; None on a CPU cluster)."""
    resources = connect(config.ray_address)
    where = resolve_address(config.ray_address) or "local"
    check_capacity(config, resources, needs(cluster_gpu(config, resources)), where)
    if not config.token_store and (nodes := alive_nodes()) > 1:
        raise UserError(f"the Ray cluster at {where} has {nodes} nodes, so a training job's ranks may run on "
                        "several: set token_store to an s3:// URI or a folder every node mounts (one token store "
                        "for all ranks)")
    return resources
