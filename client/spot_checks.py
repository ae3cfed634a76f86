"""A session's spot checks (client/verify.py decides which steps and judges): after a share of
the steps, one random stage's work is redone with the client's own blocks (`_spot_check`). A
stage found wrong is failed over like one that failed, and every stage after it is rebuilt from
the client's own outputs, since their caches hold the wrong ones (`_redo_after_wrong`).
InferenceSession (client/session.py) calls it; Failover (client/failover.py) does the rebuilding.
"""

from __future__ import annotations

import torch

from .failover import Failover
from .head_group import HeadGroupStage
from .history import History
from .peer_errors import PeerError
from .stages import RemoteLayerStage


class SpotChecks(Failover):
    """Failover, with the spot checks that find a stage wrong."""

    def _spot_check(self, T: int, hidden: torch.Tensor) -> torch.Tensor:
        """Redo one random stage's work here (client/verify.py): a layer stage's for every position
        so far, a head group's members' for this step. Returns this step's output, redone from
        that stage on if the stage's was wrong."""
        checkable = [k for k, s in enumerate(self.stages) if isinstance(s, RemoteLayerStage)
                     or isinstance(s, HeadGroupStage) and s.record is not None and s.record.has_step]
        if not checkable:
            return hidden
        stage = self.stages[self.checker.pick(checkable)]
        group = isinstance(stage, HeadGroupStage)
        try:  # the tolerance follows the dtypes the peers state
            dtypes = [self._dtype_of(conn) for conn in ([c for c, _ in stage.members] if group else [stage.conn])]
        except PeerError as e:
            # A peer that does not answer (or answers with an error) is failed over like one whose
            # step failed. Judged on float32's slack instead, an honest bfloat16 node was banned as
            # wrong (a review); left unchecked, a liar that never answers `info` would never be checked.
            self._replace(self.stages.index(stage), e)
            return self.outputs.tensor()[:, -T:]  # redone if the replacement's outputs differ
        self._recover_for(stage)  # its inputs, whole
        i = self.stages.index(stage)
        reference = None  # the stage's right outputs for every position, once computed
        if group:
            error = self.checker.wrong_member(stage, dtypes, self.swarm.options.wire)
        else:
            error, reference = self._wrong_layers(i, stage, dtypes[0])
            if stage not in self.stages:  # it failed while its outputs were recovered, and was failed over
                return hidden
            i = self.stages.index(stage)
        self.spot_checks += 1
        if error is None:
            return hidden
        self.wrong_results += 1
        if reference is None:
            reference = self.checker.reference(stage.start, stage.stop, self.history[i].tensor())
        return self._redo_after_wrong(i, error, reference)[:, -T:]

    def _wrong_layers(self, i: int, stage: RemoteLayerStage,
                      dtype: str | None) -> tuple[PeerError | None, torch.Tensor | None]:
        """Stage i's outputs for every position so far against the client's own: the error to fail
        it over with if they differ beyond what its `dtype` and the wire explain, and the client's."""
        last = i + 1 == len(self.stages)
        if not last:
            self._recover_for(self.stages[i + 1])  # its outputs, whole (asked of the stage itself)
            if stage not in self.stages:
                return None, None
            i = self.stages.index(stage)
        reference = self.checker.reference(stage.start, stage.stop, self.history[i].tensor())
        got = self.outputs.tensor() if last else self.history[i + 1].tensor()
        return self.checker.judge(stage.conn.address, f"layers {stage.start}:{stage.stop}", dtype,
                                  self.swarm.options.wire, self.checker.difference(reference, got)), reference

    def _redo_after_wrong(self, i: int, error: PeerError, reference: torch.Tensor) -> torch.Tensor:
        """Stage i computed wrong: ban its peer, give its blocks to others, and rebuild every stage
        after it from the right inputs (the client's own `reference`; their caches hold the wrong
        ones), failing over any that fails meanwhile. Returns the last stage's output for every
        position."""
        stop = self.stages[i].stop
        if i + 1 < len(self.stages):  # cut short (Ctrl-C) from here on, they are rebuilt at the next step
            self.history[i + 1] = History.of(reference)
            self._unsettled.update(dict.fromkeys(self.stages[i + 1:], False))
        self._replace(i, error, reopen_after=False)  # reopened here, from the client's own outputs
        k = self._after(stop)
        if k is None:
            return reference
        self.history[k] = History.of(reference)
        self._reopen_from(k)
        return self.outputs.tensor()
