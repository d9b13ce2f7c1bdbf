"""Follow a rollout with a live progress bar until it ends, and say how it ended."""

import time
from dataclasses import dataclass

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from autogen_cli import output
from autogen_cli.client import JSON, Client
from autogen_cli.context import Exit

ENDED = {"completed", "cleared"}
FINISHED_STATES = ("confirmed", "failed", "cancelled")
IN_FLIGHT_STATES = ("pending", "sent", "updating", "awaiting_return")


def counts_of(rollout: JSON) -> dict[str, int]:
    """The rollout's per-state device counts (missing ones as 0)."""
    raw = rollout.get("counts")
    counts = raw if isinstance(raw, dict) else {}
    return {state: int(counts.get(state) or 0) for state in (*IN_FLIGHT_STATES, *FINISHED_STATES)}


def summary(rollout: JSON, *, total: bool = True) -> str:
    """`8/10 finished · 7 confirmed · 1 failed · 2 updating` (zero states left out)."""
    counts = counts_of(rollout)
    done = sum(counts[s] for s in FINISHED_STATES)
    parts = [f"{done}/{sum(counts.values())} finished"] if total else []
    parts += [f"{counts[s]} {s.replace('_', ' ')}" for s in (*FINISHED_STATES, *IN_FLIGHT_STATES)]
    return " · ".join(p for p in parts if not p.startswith("0 "))


@dataclass(frozen=True)
class Outcome:
    """How following ended: the last rollout seen, and the exit code it means."""

    rollout: JSON
    code: Exit
    message: str


def outcome(rollout: JSON, *, timed_out: bool) -> Outcome:
    """Exit 0 only for a rollout completed with no failed device."""
    status = str(rollout.get("status"))
    reason = rollout.get("status_reason")
    because = f" ({reason})" if reason else ""
    failed = counts_of(rollout)["failed"]
    if status == "completed" and not failed:
        return Outcome(rollout, Exit.OK, f"Rollout completed{because}: {summary(rollout)}.")
    if status == "completed":
        return Outcome(rollout, Exit.OUTCOME, f"Rollout completed with {failed} failed device(s).")
    if status in ENDED or not timed_out:
        return Outcome(rollout, Exit.OUTCOME, f"Rollout {status}{because}: {summary(rollout)}.")
    return Outcome(
        rollout,
        Exit.TIMEOUT,
        f"Still {status} when the wait ended; it goes on: autogen rollouts follow {rollout['id']}",
    )


def follow(
    api: Client,
    rollout_id: str,
    *,
    timeout_s: float | None,
    interval_s: float,
    stop_on_pause: bool,
) -> Outcome:
    """Poll the rollout, drawing a bar of finished / all devices, until it ends or the wait does.

    Ctrl-C (KeyboardInterrupt) propagates: the caller says the rollout goes on.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    console = output.stderr()
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
    )
    last_status: str | None = None
    with progress:
        task = progress.add_task(rollout_id, total=None, detail="")
        while True:
            rollout = api.rollout(rollout_id)
            status = str(rollout.get("status"))
            counts = counts_of(rollout)
            progress.update(
                task,
                description=f"{rollout_id} {status}",
                total=sum(counts.values()) or None,
                completed=sum(counts[s] for s in FINISHED_STATES),
                detail=summary(rollout, total=False),
            )
            if status != last_status:
                # A line per change too, so logs of a non-interactive run tell the story.
                reason = rollout.get("status_reason")
                progress.console.print(
                    Text(f"{rollout_id}: {status}" + (f" ({reason})" if reason else ""))
                )
                last_status = status
            if status in ENDED or (stop_on_pause and status == "paused"):
                return outcome(rollout, timed_out=False)
            if deadline is not None and time.monotonic() >= deadline:
                return outcome(rollout, timed_out=True)
            time.sleep(interval_s)
