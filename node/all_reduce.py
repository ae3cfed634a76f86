"""A head group's all-reduce, on one of its members.

A head group's members each hold a share of the heads (and of the MLP) of the same blocks. Met by
the client (client/head_group.py, fan-out), a token costs two round trips to every member a block.
In an all-reduce the client sends a step once to every member, naming the whole group (`group`:
each member's [contact, session], in member order; `member`: this one's index). Each member then,
block by block and phase by phase (attention, MLP):

- computes its partial sum and sends it to every other member (`partial`, over the node's relay
  links: node/relay.py), in the step's wire format;
- waits, without holding the node's loop, for the others' partials of that phase;
- adds every member's partial to the residual in member order, in float32 on the CPU: the sums
  the client adds in a fan-out (the step's input and output travel in float32 whatever the wire,
  as the client's residual is kept; a phase's input is rounded to the wire as a fan-out sends
  it), so the output is the same to the bit (batched with the same other sessions);
- goes on to the next phase.

After the last block every member answers the client with the output. A partial is taken only
from the member the step names, by its CURVE key (from its contact, as ZAP gives each message's:
node/server.py); a member may be one phase ahead of another, and a partial may come before the
step it belongs to, so partials of this phase and the next are kept until used. A member that
has not had every partial of a phase within the step's `wait` answers `relay_failed`, its session
as before the step (the client then meets the members itself, its first phase step rewinding
each, which ends a step still running: `end`; client/head_group.py). The one-position phases of
several sessions at the same block and phase run in one forward pass, as a fan-out's phase steps
do (node/steps.py); a session whose phase was summed waits a little (HOLD_SECONDS, to the server
poll's next whole millisecond) for those of its group a phase behind, so that sessions stepped
together go on sharing passes (`_hold_back`). Each partial is sent the moment it is computed.

After its client cut a step short (Ctrl-C), the next step comes with `rewind` and a greater
`epoch`, the session's rewind number, which every step and partial carries (`start`): a member
still running the cut step ends it, drops what the session holds from `pos` on, and refuses the
cut step's partials that come late (an earlier epoch: `take`); those of the rewound step that come
before it, while the cut one runs, are kept for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from nanoswarm.protocol.errors import ErrorCode, ProtocolError
from nanoswarm.protocol.messages import Message, encode_frames
from nanoswarm.protocol.tensors import frame_finite, frame_tensor, to_frame

from .group_step import GroupStep, check_step
from .partials import KeptPartials
from .relay import Relay, next_hop_id
from .sessions import SessionStore
from .steps import Reply, StepRunner, _stored_block, _unsendable, inference

log = logging.getLogger(__name__)

# A phase's sums, come in, wait at most this long (or two forward passes) for those of steps of the
# same group one phase behind, so that the next phase runs as one pass for all (`_hold_back`).
HOLD_SECONDS = 0.003
# Steps that sent their partial this long ago and still wait are not waited for (a member that
# stopped, or a step its client gave up): those of a phase-mate come within a pass or two.
BEHIND_SECONDS = 0.02


def _as_sent(y: torch.Tensor, frame: object, wire: str) -> torch.Tensor:
    """`y` as a member that is sent `frame` reads it: float32 on the CPU."""
    if wire == "float32" and y.dtype is torch.float32 and y.is_cpu:
        return y
    return frame_tensor(frame, wire, tuple(y.shape)).to(torch.float32)


class AllReduces:
    """The all-reduce steps in progress on a node (one a session) and the partials kept for them.
    `start` takes a step and `take` a partial (both raise ProtocolError for what they refuse);
    `advance`, after each batch, goes on with the steps started or sent partials; `expire` fails
    those that waited too long, `forget_stale` drops partials nobody will use. `advance` and
    `expire` return the replies to send: results, errors, and partials to other members (as
    Relay destinations: node/server.py sends them)."""

    def __init__(self, runner: StepRunner, sessions: SessionStore):
        self.runner = runner
        self.sessions = sessions
        self.steps: dict[str, GroupStep] = {}  # session id -> its step in progress
        self.kept = KeptPartials(runner.config.n_embd)  # the other members' partials
        self._touched: set[str] = set()  # sessions that got partials since the last advance
        self._due: list[GroupStep] = []  # steps started since the last advance
        self._held: list[GroupStep] = []  # steps whose next phase waits for phase-mates (_hold_back)
        self._hold_until = 0.0
        self.checks_keys = False  # set by the handler when the node knows senders' keys (CURVE)
        # Sends partials the moment they are computed (node/server.py sets it); None: `advance`
        # returns them with the rest.
        self.send: Callable[[list[Reply]], None] | None = None

    # ----- a step ----------------------------------------------------------------------------
    def start(self, peer: bytes, msg: Message, can_relay: Callable[[str], bool] | None) -> list[Reply]:
        """An all-reduce step from its session's owner: checked (ProtocolError otherwise, the
        session unchanged); its first phase is computed at the end of the batch (`advance`), with
        the other sessions' due then. A rewound one (`rewind`, after its client cut a step short)
        first ends the session's step still running, if any (its answer returned: `bad_position`),
        and drops what the session holds from `pos` on, and the partials of earlier epochs."""
        g = check_step(self.runner, self.sessions, peer, msg, can_relay, self.checks_keys)
        out: list[Reply] = []
        if g.rewind:
            s = g.session
            old = self.steps.get(s.id)
            if old is not None:  # (its partials come late, of an earlier epoch: `take` refuses them)
                out = self._fail(old, ErrorCode.BAD_POSITION, "a rewound step of this session ended this one")
            s.cache.length, s.next_block, s.epoch = g.pos, 0, g.epoch
            self.kept.forget(s.id, before=g.epoch)
        self.steps[g.session.id] = g
        self._due.append(g)
        return out

    def end(self, sid: str) -> list[Reply]:
        """End session `sid`'s step, if one runs, answered `bad_position`, the session as before it,
        and forget the partials kept for it: its client goes on by fan-out (a phase step that
        rewinds, client/head_group.py)."""
        g = self.steps.get(sid)
        out = [] if g is None else self._fail(g, ErrorCode.BAD_POSITION, "a rewound phase step of this session "
                                                                         "ended this one")
        self.kept.forget(sid)
        return out

    def _compute(self, due: list[GroupStep]) -> list[Reply]:
        """This member's partials of the steps `due`, each kept (`own`) and sent to the other
        members; the one-position steps at the same block and phase in one forward pass (decode
        reads every weight either way), as a fan-out's phase steps are (node/steps.py)."""
        groups: dict[tuple, list[GroupStep]] = {}
        for g in due:
            if self.sessions.sessions.get(g.session.id) is not g.session:
                self._end(g)  # closed since (a `close` later in its batch): its cache may be another's now
                continue
            if self.steps.get(g.session.id) is not g:  # ended by a rewound step later in its batch
                continue
            key = (g.block, g.phase, g.session.start if g.phase == "attn" else 0) if g.shape[1] == 1 else (id(g),)
            groups.setdefault(key, []).append(g)
        out: list[Reply] = []
        for batch in groups.values():
            try:
                ys = self._forward(batch)
            except ProtocolError as e:
                for g in batch:
                    out.extend(self._fail(g, e.code, e.message))
                continue
            except torch.cuda.OutOfMemoryError:  # device memory taken meanwhile: as a phase step's
                for g in batch:
                    out.extend(self._fail(g, ErrorCode.BUSY, self.runner.out_of_memory()))
                continue
            except Exception as e:  # a bug must not leave the sessions half stepped
                log.exception("internal error in an all-reduce step")
                self.runner.note_error(e)
                for g in batch:
                    out.extend(self._fail(g, ErrorCode.INTERNAL, type(e).__name__))
                continue
            for g, (x, y) in zip(batch, ys):
                try:
                    out.extend(self._send(g, x, y))
                except ProtocolError as e:
                    out.extend(self._fail(g, e.code, e.message))
            if self.send is not None:
                # Sent before anything else is computed: a member whose partials came before its
                # own were done (it woke later for the step) goes on to the next phase in this
                # loop, and held back, its partial kept every other member waiting for that
                # phase's compute too; the members then took turns instead of computing at once.
                # (Review147: sent after the whole `due`, they waited for another batch's pass, a
                # prefill's say.)
                self.send([r for r in out if isinstance(r[0], Relay)])
                out = [r for r in out if not isinstance(r[0], Relay)]
        return out

    def _forward(self, batch: list[GroupStep]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The partials of `batch` (steps at one block and phase), each with its input."""
        runner, first = self.runner, batch[0]
        as_is = runner._cpu and runner.dtype is torch.float32  # (every step's x is float32 on the CPU)
        xs = []
        for g in batch:
            x = g.x if g.wire == "float32" else _as_sent(g.x, to_frame(g.x, g.wire), g.wire)  # as a fan-out sends it
            xs.append(x if as_is else x.to(runner.device, runner.dtype))
        x = torch.cat(xs) if len(xs) > 1 else xs[0]
        tokens = len(batch) * first.shape[1]  # (several steps: one position each)
        layer = runner.blocks.h[str(first.block)]
        if first.phase == "attn":  # (in advance()'s inference mode)
            caches = [g.session.cache for g in batch]
            y = runner._timed(lambda: layer.attn_partial(x, caches, first.block - first.session.start), tokens)
            for g in batch:
                _stored_block(g.session, g.shape[1])
        else:
            y = runner._timed(lambda: layer.mlp_partial(x), tokens)
        if len(batch) > 1:
            runner.stats.batched_steps += 1
            runner.stats.max_batch = max(runner.stats.max_batch, len(batch))
        busy = int(runner._last_busy * 1e6)
        for g in batch:
            g.busy_us += busy
        return list(zip(xs, y.split(1) if len(batch) > 1 else [y]))

    def _send(self, g: GroupStep, x: torch.Tensor, y: torch.Tensor) -> list[Reply]:
        """g's partial `y` (of input `x`) kept, and sent to every other member."""
        frame = to_frame(y, g.wire)
        # Computed and sent in float32, a value that is not finite makes the residual so, which
        # _result refuses (every member's, each at once). Else the phase says what overflowed:
        # the wire, or this node's float16. (Not checked twice: ~20 us a phase, cold.)
        exact = g.wire == "float32" and self.runner.dtype is torch.float32  # (y goes as computed)
        if not exact:
            problem = _unsendable(x, y, g.wire, frame)
            if problem:
                raise ProtocolError(ErrorCode.BAD_VALUE, problem)
        g.own = y if exact else _as_sent(y, frame, g.wire)
        now = time.monotonic()
        g.session.last_used, g.deadline = now, now + g.wait
        out: list[Reply] = []
        spec = [(g.wire, g.shape)]  # (a partial has its input's shape)
        for j, (contact, session) in enumerate(g.members):
            if j != g.me:
                # (keyed by the receiver's session: only a latest partial is answered relay_failed
                # when its link drops, node/relay.py)
                relay = Relay(contact, g.reply_to[0], g.reply_to[1], next_hop_id(), session)
                out.append((relay, encode_frames("partial", relay.hop_id, {
                    "session": session, "pos": g.pos, "block": g.block, "phase": g.phase, "member": g.me,
                    **({"epoch": g.epoch} if g.epoch else {})}, spec, [frame])))
        return out

    def _sum(self, g: GroupStep) -> Reply | bool:
        """Add every member's partial of g's phase to its residual, if all have come (False if
        not), and go on: True when its next phase is due, or the reply when the step is done."""
        kept = self.kept.of(g.session.id)
        for j in range(len(g.members)):
            if j != g.me and (g.pos, g.block, g.phase, j, g.epoch) not in kept:
                return False
        total = None
        for j in range(len(g.members)):  # in member order: the client's sums, to the bit
            if j == g.me:
                partial = g.own
            else:
                _, key, partial, tokens = self.kept.pop(g.session.id, (g.pos, g.block, g.phase, j, g.epoch))
                if key != g.keys[j]:  # (came before the step, whose group names another key for j)
                    raise ProtocolError(ErrorCode.RELAY_FAILED, f"the partial for member {j} came from another "
                                        "CURVE key than its contact names")
                if tokens != g.shape[1]:  # (came before the step: `take` did not know its positions)
                    raise ProtocolError(ErrorCode.RELAY_FAILED, f"member {j} sent a partial of shape "
                                        f"{[1, tokens, g.shape[2]]} for hidden states {list(g.shape)}")
            # A new tensor for the first sum (g.x may be a view of the step's message), the rest
            # added in place: the same float32 additions in the same order, one allocation.
            total = g.x + partial if total is None else total.add_(partial)
        g.x = total
        if g.phase == "attn":
            g.phase = "mlp"
            return True
        g.block, g.phase = g.block + 1, "attn"
        return self._result(g) if g.block == g.session.stop else True

    def _result(self, g: GroupStep) -> Reply:
        self._end(g)
        frame = to_frame(g.x, "float32")  # the residual as the client keeps it (review129)
        if not frame_finite(frame, "float32"):
            self._undo(g)
            # (its input was finite: check_step refuses one that is not; review146: this blamed the input)
            return g.reply_to[0], self.runner.error(g.reply_to[1], ErrorCode.BAD_VALUE, "the step's sums are "
                                                    "not finite (a member's partial was not, or they overflowed)")
        y = g.x
        if g.last is not None and g.last < y.shape[1]:  # (checked whole above: any row may be the bad one)
            y = y[:, -g.last:]
            frame = to_frame(y, "float32")
        return g.reply_to[0], encode_frames("result", g.reply_to[1], {"busy_us": g.busy_us},
                                            [("float32", tuple(y.shape))], [frame])

    def _end(self, g: GroupStep) -> None:
        if self.steps.get(g.session.id) is g:
            del self.steps[g.session.id]
        # (partials of a later epoch may have come: those of a rewound step, sent before this
        # member got it; they wait for it)
        self.kept.forget(g.session.id, before=g.epoch + 1)

    def _undo(self, g: GroupStep) -> None:
        g.session.cache.length, g.session.next_block = g.pos, 0

    def _fail(self, g: GroupStep, code: ErrorCode, why: str) -> list[Reply]:
        self._end(g)
        if self.sessions.sessions.get(g.session.id) is not g.session:
            # Closed meanwhile (its cache may serve another session now), by its client or with its
            # client's connection: nobody waits. (Not reclaimed idle: RequestHandler.expire_idle.)
            return []
        self._undo(g)
        return [(g.reply_to[0], self.runner.error(g.reply_to[1], code, why[:500]))]

    # ----- partials --------------------------------------------------------------------------
    def take(self, msg: Message, key: str | None) -> None:
        """A partial from another member, kept until its phase is summed (ProtocolError when it
        cannot belong to a step of that session's, now or next). Before its step comes, one per
        member is kept, whoever sent it (its key is checked when the step names the member's);
        one of a rewound step (a later epoch) while a step runs, only from the member's key, and
        one per member, of the latest epoch (review200: any number, from anyone, filled what the
        node keeps for every session)."""
        f = msg.fields
        session = self.sessions.sessions.get(f["session"])
        if session is None:
            raise ProtocolError(ErrorCode.UNKNOWN_SESSION, f"no session {f['session'][:40]!r} on this node")
        pos, block, phase, member = f["pos"], f["block"], f["phase"], f["member"]
        epoch = f.get("epoch") or 0
        g = running = self.steps.get(session.id)
        if epoch < session.epoch:  # (a step runs at the session's epoch)
            raise ProtocolError(ErrorCode.BAD_POSITION, f"a partial of epoch {epoch}: the session's all-reduce "
                                "steps of that epoch were rewound")
        if g is not None and epoch > g.epoch:
            g = None  # a rewound step's, sent before this member got it: kept for it as for any step to come
        shape = msg.specs[0][1] if len(msg.frames) == 1 else ()
        if len(shape) != 3 or shape[0] != 1 or shape[2] != self.runner.config.n_embd \
                or not 1 <= shape[1] <= self.runner.limits.max_tokens_per_step \
                or g is not None and shape[1] != g.shape[1]:
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"a partial is one tensor [1, tokens, "
                                f"{self.runner.config.n_embd}], of the step's tokens")
        if g is None:  # before its step came: only the first phase of the session's next position
            # (of a rewound step's, any position it holds), of positions the session can still
            # take (review168: one of 48 was kept for a session of 1)
            at = pos <= session.length if epoch > session.epoch else pos == session.length and not session.next_block
            ok = at and pos >= 0 and block == session.start and phase == "attn" \
                and 0 <= member < self.runner.config.n_head and pos + shape[1] <= session.cache.max_length \
                and (running is None or member < len(running.members) and member != running.me)
        else:  # the phase waited on, or the next (a member that has all of this one's is ahead)
            nxt = (g.block, "mlp") if g.phase == "attn" else (g.block + 1, "attn")
            ok = pos == g.pos and (block, phase) in ((g.block, g.phase), nxt) and 0 <= member < len(g.members) \
                and member != g.me
        if not ok:
            raise ProtocolError(ErrorCode.BAD_POSITION, f"no all-reduce of this session waits for block {block} "
                                f"{str(phase)[:8]} at position {pos} from member {member}")
        key = key if self.checks_keys else None
        if running is not None and key != running.keys[member]:  # (a rewound step names the same group)
            raise ProtocolError(ErrorCode.NOT_SERVED, f"a partial for member {member} comes only from its key")
        if epoch > session.epoch:
            self.kept.keep_latest(session.id, member, epoch, after=session.epoch)
        self.kept.add(session.id, (pos, block, phase, member, epoch), key, shape[1],
                      self.runner.limits.max_message_bytes, lambda: msg.tensor(0))
        self._touched.add(session.id)

    def advance(self) -> list[Reply]:
        """Go on with the steps started or sent partials since the last call, as far as they can
        go now: each phase whose partials have all come summed, and the next phases due computed
        (one forward pass for several sessions' where they can share one)."""
        if not (self._due or self._touched or self._held):
            return []
        with inference():
            return self._advance()

    def _advance(self) -> list[Reply]:
        out: list[Reply] = []
        due, self._due = self._due, []
        touched, self._touched = self._touched, set()
        while due or touched or self._held:  # (held steps: computed once their hold ends)
            waiting = {g.session.id for g in (*due, *self._held)}
            for sid in touched - waiting:  # (a step still to compute its own partial cannot sum)
                g = self.steps.get(sid)
                if g is None:
                    continue
                if self.sessions.sessions.get(sid) is not g.session:  # closed meanwhile: nobody waits
                    self._end(g)
                    continue
                try:
                    done = self._sum(g)
                except ProtocolError as e:
                    out.extend(self._fail(g, e.code, e.message))
                    continue
                if done is True:
                    due.append(g)
                elif done:
                    out.append(done)
            due = self._hold_back(due)
            if not due:  # (nothing summed, or held: the partials waited on have not all come)
                break
            out.extend(self._compute(due))  # (partials sent in it, where `send` is set)
            # partials of the phases just computed may have come already (a member that woke
            # later for the step); else `take` touches the session when they come
            touched = {g.session.id for g in due if self.kept.of(g.session.id) and g.session.id in self.steps}
            due = []
        return out

    def _hold_back(self, due: list[GroupStep]) -> list[GroupStep]:
        """Of the steps `due` and those held before, the ones to compute now. A step whose phase
        was summed waits for steps of its group (the same members) one phase behind it, for a
        while: their partials come from members computing them now, and the two then share the
        next phase's forward pass, and every one after. Without it, sessions whose steps reached
        the members a little apart (a client sends them one by one) kept the split they started
        with through every phase: 8 sessions stepped together ran ~3 to a pass (2.4-2.8x one
        session), not 8. A step computed for the first time is never held, nor one of several
        positions (it runs alone anyway), nor any once the hold runs out."""
        if self._held:
            due, self._held = [g for g in self._held if self.steps.get(g.session.id) is g] + due, []
        now = time.monotonic()
        if len(self.steps) < 2 or not due or (self._hold_until and now >= self._hold_until):
            self._hold_until = 0.0
            return due
        behind = self._behind(now)
        go: list[GroupStep] = []
        for g in due:
            summed = (g.block, "attn") if g.phase == "mlp" else (g.block - 1, "mlp")  # the phase before g's next
            held = g.own is not None and g.shape[1] == 1 and (g.contacts, *summed, g.session.start) in behind
            (self._held if held else go).append(g)
        if not self._held:
            self._hold_until = 0.0
        elif not self._hold_until:
            stats = self.runner.stats
            mean = stats.busy_seconds / stats.steps if stats.steps else HOLD_SECONDS
            self._hold_until = now + min(HOLD_SECONDS, 2 * mean)
        return go

    def _behind(self, now: float) -> set[tuple]:
        """Where one-position steps are that a phase-mate may wait for: (group, block, phase,
        the session's first block) of each about to compute that phase (started now), or waiting
        for its partials since lately (BEHIND_SECONDS), its session open. A step summed the phase
        before waits for those of its group at the phase it has just summed."""
        return {(h.contacts, h.block, h.phase, h.session.start) for h in self.steps.values()
                if h.shape[1] == 1 and (h.own is None or h.deadline - h.wait > now - BEHIND_SECONDS)
                and self.sessions.sessions.get(h.session.id) is h.session}

    def expire(self, now: float | None = None) -> list[Reply]:
        """Fail the steps that waited past their deadline for a partial (`relay_failed`: the
        session as before the step), and go on with those held (`_hold_back`) once their hold
        runs out. Called from the server's loop while steps run."""
        now = time.monotonic() if now is None else now
        out: list[Reply] = []
        if self._held and now >= self._hold_until:
            out.extend(self.advance())
        held = {id(g) for g in self._held}  # (their partials came: computed once their hold ends)
        for g in [g for g in self.steps.values() if g.deadline <= now and id(g) not in held]:
            missing = [j for j in range(len(g.members)) if j != g.me and (g.pos, g.block, g.phase, j, g.epoch)
                       not in self.kept.of(g.session.id)]
            out.extend(self._fail(g, ErrorCode.RELAY_FAILED, f"no partial of block {g.block} {g.phase} from member"
                                  f"{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
                                  f"({', '.join(g.members[j][0][:80] for j in missing)}) within {g.wait:g} s"))
        return out

    def forget_stale(self, now: float | None = None) -> None:
        """Forget the partials kept for sessions that are gone, and those that waited MAX_WAIT for
        a step that never came (its member refused it, say). Called on a timer."""
        self.kept.forget_stale(self.sessions.sessions, {sid: g.epoch for sid, g in self.steps.items()},
                               time.monotonic() if now is None else now)

    def next_deadline(self) -> float | None:
        # (only while steps run: the server calls expire(), which ends a hold, only then; a hold
        # left with none would make its poll spin)
        if not self._held:  # (every turn of the loop while steps run)
            return min((g.deadline for g in self.steps.values()), default=None)
        held = [self._hold_until] if self.steps else []
        waiting = {id(g) for g in self._held}  # (a held step's own deadline may be past: expire() skips it)
        return min([*held, *(g.deadline for g in self.steps.values() if id(g) not in waiting)], default=None)
