"""`python -m gateway.simulator`: run the demo fleet from a device file, or N load devices.

python -m gateway.simulator --devices .local/demo/devices.json --time-factor 0.1
python -m gateway.simulator --generate 10000 --username U --password P --telemetry-interval 30
python -m gateway.simulator --fault ota_fail=DEV1,DEV2 --fault malformed=0.05 --fault flapping
"""

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import random
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from common.catalog import MODELS
from gateway.simulator.model import FAULTS, DeviceSpec, Timing
from gateway.simulator.runner import Fleet, SimulatedDevice

logger = logging.getLogger("gateway.simulator")
DEFAULT_FILE = Path(".local/demo/devices.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m gateway.simulator", description=__doc__)
    parser.add_argument("--devices", type=Path, default=DEFAULT_FILE, help="device file (JSON)")
    parser.add_argument("--generate", type=int, default=0, help="N load devices instead of a file")
    parser.add_argument("--id-prefix", default="sim-", help="ids of generated devices")
    parser.add_argument("--username", help="one broker account for all generated devices")
    parser.add_argument("--password", help="its password")
    parser.add_argument("--host", help="broker host (default: the file's, or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="broker port (default: the file's, or 1883)")
    parser.add_argument("--time-factor", type=float, default=1.0, help="scale every delay")
    parser.add_argument("--telemetry-interval", type=float, default=10.0, help="seconds")
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND=WHO",
        help=f"KIND one of {', '.join(FAULTS)}; WHO: all, a fraction (0.1) or ids (a,b)",
    )
    parser.add_argument("--duration", type=float, default=0, help="stop after seconds (0: never)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def assign_faults(ids: list[str], specs: list[str], rng: random.Random) -> dict[str, set[str]]:
    """Which devices get which faults, from `KIND=all|fraction|id,id` options."""
    faults: dict[str, set[str]] = {i: set() for i in ids}
    for spec in specs:
        kind, _, who = spec.partition("=")
        if kind not in FAULTS:
            raise SystemExit(f"unknown fault {kind!r}; one of {', '.join(FAULTS)}")
        if who in ("", "all"):
            chosen = ids
        else:
            try:
                share = float(who)
            except ValueError:
                chosen = [i for i in who.split(",") if i]
            else:
                chosen = rng.sample(ids, round(len(ids) * share))
        for device_id in chosen:
            faults.setdefault(device_id, set()).add(kind)
    return faults


def load_file(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The device file: `{"mqtt": {"host", "port"}, "devices": [...]}`."""
    body = json.loads(path.read_text())
    return dict(body.get("mqtt") or {}), list(body["devices"])


def generated(
    count: int, prefix: str, username: str | None, password: str | None
) -> list[dict[str, Any]]:
    """`count` devices cycling through every model and transport, a third with GPS."""
    variants = [(m, t) for m, model in MODELS.items() for t in model.transports]
    out = []
    for n in range(count):
        model, transport = variants[n % len(variants)]
        engines = MODELS[model].engines
        out.append(
            {
                "id": f"{prefix}{n:05d}",
                "model": model,
                "engine": engines[n % len(engines)] if engines else None,
                "transport": transport,
                "gps": n % 3 == 0,
                "firmware_version": "1.0.0",
                "username": username,
                "password": password,
            }
        )
    return out


def raise_file_limit(needed: int) -> int:
    """One socket per device: lift the soft open-files limit to the hard one; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        logger.warning("open files limited to %s for %s devices", soft, needed)
    return soft


async def run(args: argparse.Namespace) -> int:
    """Run the fleet until a signal or `--duration`."""
    rng = random.Random(args.seed)  # noqa: S311 - a simulation
    mqtt: dict[str, Any] = {}
    if args.generate:
        rows = generated(args.generate, args.id_prefix, args.username, args.password)
    else:
        if not args.devices.is_file():
            print(f"no device file {args.devices} (see --help)", file=sys.stderr)  # noqa: T201
            return 2
        mqtt, rows = load_file(args.devices)
    faults = assign_faults([r["id"] for r in rows], args.fault, rng)
    fields = set(DeviceSpec.__dataclass_fields__) - {"faults"}
    specs = [
        DeviceSpec(**{k: v for k, v in r.items() if k in fields}, faults=frozenset(faults[r["id"]]))
        for r in rows
    ]
    raise_file_limit(len(specs) + 256)
    fleet = Fleet(
        host=args.host or mqtt.get("host", "127.0.0.1"),
        port=args.port or int(mqtt.get("port", 1883)),
        timing=Timing(telemetry_interval_s=args.telemetry_interval).scaled(args.time_factor),
        persistent_sessions=not args.generate,
        seed=args.seed,
        spread_s=max(2.0, len(specs) / 500),  # about 500 new connections a second at most
    )
    # The telemetry interval is its own knob: undo the factor on it.
    fleet.timing = Timing(
        **{**fleet.timing.__dict__, "telemetry_interval_s": args.telemetry_interval}
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    devices = [SimulatedDevice(spec, fleet) for spec in specs]
    logger.info(
        "simulating %d devices against %s:%d (time factor %s)",
        len(devices),
        fleet.host,
        fleet.port,
        args.time_factor,
    )
    tasks = [asyncio.create_task(d.run(stop)) for d in devices]
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=args.duration or None)
    stop.set()
    await asyncio.wait(tasks, timeout=15)
    logger.info("stopped after %.0fs", time.monotonic() - started)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    logging.getLogger("mqtt").setLevel(logging.WARNING)
    # A thousand devices in one process: the import heap is never walked by the collector
    # again (see `common.runner.freeze_import_heap`).
    gc.collect()
    gc.freeze()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
