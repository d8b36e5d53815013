"""The session's tunnel, kept: opened, verified, announced, reopened after a drop.

The driver calls it from two steps: ``serving``'s (``connect``: open and
verify the first time, or reopen after a drop) and ``tunneled``'s (``serve``:
announce, then ``alive`` about twice a second, ``dropped`` when it is not).
Its own small state is a ``TunnelPhase`` and whether the ready banner was
shown (once per client; later returns say "Tunnel back up"). The machine's
state says where the session is; the phase says what the keeper owes the
user and how ``serving`` must bring the tunnel up."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from alvis_fsm.cluster.durations import fmt_duration
from alvis_fsm.cluster.tunnel import Tunnel, TunnelDied, Verified, close_tunnel_socket, verify
from alvis_fsm.engine.session.link import Link
from alvis_fsm.errors import AlvisError, ConnectionLost, SSHError
from alvis_fsm.retry import Backoff


class TunnelPhase(StrEnum):
    NONE = "none"  # no tunnel of ours yet
    VERIFIED = "verified"  # opened and the server verified; not announced yet
    REOPENED = "reopened"  # reopened after a drop; not said yet
    UP = "up"  # up and announced
    DROPPED = "dropped"  # dropped while serving: `serving` reopens it


class GiveUp(ConnectionLost):
    """The tunnel or the login node could not be reached again: the client
    stops, the job is kept (not a failure of the job)."""


def give_up(link: Link, what: str, details: str | None) -> GiveUp:
    r = link.record
    return GiveUp(
        f"{what}; job {r.job_id} is still running",
        hint=f"`alvis-fsm resume {r.name}` reconnects; `alvis-fsm stop {r.name}` cancels it.",
        details=details,
    )


def reopen_or_give_up(link: Link) -> None:
    """Reopen the shared connection (within ssh.reconnect_window); if the
    login node stays unreachable, stop the client but keep the job."""
    try:
        link.conn.reopen()
    except SSHError as exc:
        raise give_up(link, f"Could not reach {link.conn.opts.host} again", exc.details) from exc


def _trying_again(exc: AlvisError, delay: float) -> str:
    """A failed try, with the first line of what ssh said (its reason)."""
    why = (exc.details or "").strip().partition("\n")[0]
    return (
        f"{exc.message.rstrip('.')}"
        + (f" ({why})" if why else "")
        + f"; trying again in {delay:.1f} s"
    )


class TunnelKeeper:
    def __init__(
        self,
        link: Link,
        factory: Callable[..., Tunnel] | None = None,
        verifier: Callable[..., Verified] | None = None,
    ) -> None:
        self.link = link
        self.factory: Callable[..., Tunnel] = factory or Tunnel
        self.verify = verifier or verify
        self.tunnel: Tunnel | None = None
        self.phase = TunnelPhase.NONE
        self._seen: Verified | None = None
        self._bannered = False

    def _make(self) -> Tunnel:
        r = self.link.record
        return self.factory(
            conn=self.link.conn,
            route=r.route,
            bind=r.bind,
            local_port=r.local_port,
            node=r.node,
            remote_port=r.port,
            control=Path(r.tunnel_control_path),
            remote_socket=r.remote_socket,
            local_socket=r.local_socket,
        )

    def adopt(self) -> bool:
        """A supervisor taking over a detached session keeps it `tunneled`
        when the tunnel its starter left is up: no needless re-verification
        while `status` may be looking."""
        self.tunnel = self._make()
        return self.tunnel.up()

    def open(self) -> None:
        """Open the tunnel (vLLM may still be loading: the node's login and
        the forward are then off the critical path). A connection that
        failed for now (a time-out: the node slow to answer, or a laptop that
        slept through ssh's handshake) is tried again as after a drop; a
        refusal (login, host key, port taken) is final."""
        r, ui = self.link.record, self.link.ui
        tunnel = self.tunnel = self._make()
        # A tunnel left by a detached or killed client may still be up.
        if not tunnel.up():
            where = (
                f"local port {r.local_port}" if r.local_port else f"local socket {r.local_socket}"
            )
            ui.info(f"Establishing SSH tunnel ({where})...")
            said = self._persist(tunnel.open, ConnectionLost, "open the tunnel")
            if "Permanently added" in said:
                ui.info(f"Accepted the host key of {r.node} (first connection) and recorded it")

    def bring_up(self) -> None:
        """The step of `serving`: open and verify, or, after a drop, reopen."""
        if self.phase is TunnelPhase.DROPPED:
            self._reconnect()
            self.phase = TunnelPhase.REOPENED
            return
        if self.tunnel is None:
            self.open()
        assert self.tunnel is not None
        self.link.ui.info("Testing connection...")
        self._seen = self._check(self.tunnel)
        self.phase = TunnelPhase.VERIFIED

    def _check(self, tunnel: Tunnel) -> Verified:
        r, timeouts = self.link.record, self.link.settings.timeouts
        return self.verify(
            r.local_port,
            r.api_key or None,
            timeouts.connection_test,
            r.served_name,
            local_socket=r.local_socket,
            alive=tunnel.alive,
        )

    def announce(self) -> None:
        """The ready banner, once per client; later verifications say less."""
        r, ui = self.link.record, self.link.ui
        phase, seen, self._seen = self.phase, self._seen, None
        self.phase = TunnelPhase.UP
        if phase is TunnelPhase.REOPENED or (phase is TunnelPhase.VERIFIED and self._bannered):
            ui.info(f"Tunnel back up: {r.url}")
        if phase is not TunnelPhase.VERIFIED or seen is None or self._bannered:
            return
        self._bannered = True
        ui.connected(r, seen.models, seen.first_token_s)
        left = r.time_left()
        if left is not None:
            ui.info(
                f"Time left: {fmt_duration(left)} (job {r.job_id} ends at "
                f"{time.strftime('%H:%M', time.localtime(time.time() + left))})"
            )

    def alive(self) -> bool:
        assert self.tunnel is not None
        return self.tunnel.alive()

    def dropped(self) -> None:
        self.link.ui.warn("The tunnel dropped; reconnecting (the job is untouched)...")
        self.phase = TunnelPhase.DROPPED

    def _reconnect(self) -> None:
        """Reopen a dropped tunnel and verify the server through it: its new
        ssh may die while the server is being checked, which is noticed at
        once (``TunnelDied``) and the next try starts."""
        tunnel = self.tunnel
        assert tunnel is not None

        def reopen() -> str:
            said = tunnel.open()
            self._check(tunnel)
            return said

        self._persist(reopen, AlvisError, "reopen the tunnel")

    def _persist(self, attempt: Callable[[], str], transient: type[AlvisError], what: str) -> str:
        """``attempt`` until it succeeds, at most tunnel.max_reconnects
        tries, backing off between them (the one policy, retry.Backoff); a
        failure that is not ``transient`` is final. The shared connection
        (the tunnel's jump) is reopened first when it went too."""
        link = self.link
        tries = Backoff(first=0.5, most=10.0)
        redropped = False
        while True:
            link.stop.check()
            if not link.conn.alive():
                # Wait for the login node as long as ssh.reconnect_window
                # says, as everywhere else, not max_reconnects tries.
                reopen_or_give_up(link)
            try:
                return attempt()
            except transient as exc:
                again = isinstance(exc, TunnelDied)
                if again:
                    # A drop during recovery is a drop: say so, and reopen.
                    link.ui.warn(
                        "The tunnel dropped again while it was being reopened; reopening..."
                    )
                if tries.failed() >= link.settings.tunnel.max_reconnects:
                    raise give_up(
                        link, f"Could not {what} after {tries.failures} tries", exc.message
                    ) from exc
                if again and not redropped:
                    redropped = True  # at once the first time; a tunnel that keeps dying backs off
                    continue
                if not again:
                    link.ui.warn(_trying_again(exc, tries.delay))
                if not tries.wait(link.stop.event):
                    link.stop.check()

    def close(self) -> None:
        """Close the tunnel: ours, or the one a detached client left (by its socket)."""
        r = self.link.record
        if self.tunnel is not None:
            self.tunnel.close()
        elif r.tunnel_control_path:
            close_tunnel_socket(self.link.conn, Path(r.tunnel_control_path), r.node)
