"""The lockstep arms' averager: hivemind's butterfly all-reduce, with every peer ending on the same bits, and a report
of what each round actually received.

hivemind 1.1.12's `AllReduceRunner` has each part's reducer send every sender the *difference* between the average and
that sender's own part, which the sender adds back (`averaging/allreduce.py`, `_communicate_with_peer` and
`_accumulate_parts_streaming`). In float32, `x + (avg - x)` is not `avg` (about a third of the elements differ in the
last bit for gradients of mixed signs), and it rounds differently on every peer, so DDP replicas drift apart by
rounding. Here the reducer sends the average itself and every sender copies it in, so all peers hold the reducer's
bits; with a codec, the reducer's own part goes through the same codec as the parts it sends. The messages have the
same size as hivemind's; only farflung's lockstep peers speak this variant (a swarm arm keeps hivemind's
`hivemind.Optimizer`, which outside peers join).

hivemind also finishes a round that did not receive every part without failing it: a reducer that fails
(`TensorPartContainer.register_failed_reducer`) leaves its part of the vector at the peer's own values, and a sender
that fails is left out of the reducer's average (`AllReduceRunner._ban_sender`); it only logs "Averaging: received
X% results". `step` here returns a `RoundReport` that says so, and the peer treats such a round as failed
(`cluster.real.peer.RealPeer.exchange`), so that the driver repeats it on every peer, unless a member failed in it
on purpose (a fault trace's exchange fault): then the survivors step on it, as hivemind's do
(`cluster.real.lockstep_churn`).

A swarm's gradient averager (`SwarmGradientAverager`) keeps hivemind's protocol and its behaviour, and reports the same
figures per round for the records. `FaultHook` injects such a round for tests (`RealOptions.drop_parts_at`), and
the exchange faults of a fault trace (`fail_next_round`: the peer dies before, while sending or while reducing, or
cancels), in a swarm's gradient and state averagers and a lockstep peer's alike (`PhaseFaults`; where and how:
`cluster.real.exchange_faults`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.optim.grad_averager import GradientAverager
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture, get_dht_time
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, as_aiter, attach_event_on_finished, azip

from cluster.real.exchange_faults import die
from cluster.real.secret import SecretSchema


@dataclass(frozen=True)
class RoundReport:
    """What one all-reduce gave this peer: the group (worker indices, gathered from every member), the fraction of the
    vector that came back averaged, and the workers whose part or contribution went missing."""

    workers: tuple[int, ...]
    received_fraction: float
    missing_workers: tuple[int, ...]
    # Seconds from the formed group to the end of the all-reduce (load balancing and transfer); the rest of a `step`
    # is hivemind's matchmaking (and the call's own overhead).
    allreduce_s: float = 0.0

    @property
    def complete(self) -> bool:
        return self.received_fraction == 1.0 and not self.missing_workers


class ExactAllReduceRunner(AllReduceRunner):
    """hivemind's runner with averages on the wire instead of deltas (see the module docstring); with
    `averages_on_wire=False` hivemind's own protocol (`SwarmGradientAverager`)."""

    def __init__(self, *args, averages_on_wire: bool = True, drop_after_first_part: bool = False,
                 fault: tuple[str, int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.averages_on_wire = averages_on_wire
        self.drop_after_first_part = drop_after_first_part  # a fault for tests: see FaultHook.drop_parts_once
        # An exchange fault: (phase, the pid of the peer's actor, which dies with it), `cluster.real.exchange_faults`.
        self.fault_phase, self.peer_pid = fault if fault is not None else (None, 0)
        me = self.ordered_peer_ids.index(self.peer_id)
        parts = self.tensor_part_container.num_parts_by_peer
        self._parts_to_send = sum(p for i, p in enumerate(parts) if i != me)
        self._parts_sent = 0
        self._sends_left = sum(1 for i, p in enumerate(parts) if i != me and p > 0)
        self._sends_done = asyncio.Event()
        if self._sends_left == 0:
            self._sends_done.set()
        # With averages on the wire a failed reducer's part is the sender's own values, not a zero delta.
        self.tensor_part_container.return_deltas = not averages_on_wire
        self.failed_reducers: set[int] = set()
        register_failed = self.tensor_part_container.register_failed_reducer

        def remember_failed_reducer(peer_index: int):
            self.failed_reducers.add(peer_index)
            register_failed(peer_index)

        self.tensor_part_container.register_failed_reducer = remember_failed_reducer

    def _local_average(self, peer_index: int, part_index: int, averaged_part, tensor_part):
        """This peer's own part as the others receive it: the average through the codec (or hivemind's delta)."""
        if not self.averages_on_wire:
            return averaged_part - tensor_part
        container = self.tensor_part_container
        _, info = container._input_parts_by_peer[peer_index][part_index]
        return deserialize_torch_tensor(container.compression.compress(averaged_part, info))

    async def _communicate_with_peer(self, peer_id):
        # hivemind's method, registering averages instead of deltas (unless averages_on_wire is off).
        peer_index = self.ordered_peer_ids.index(peer_id)
        if peer_id == self.peer_id:
            sender_index = self.sender_peer_ids.index(peer_id)
            for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
                averaged_part = await self.tensor_part_reducer.accumulate_part(
                    sender_index, part_index, tensor_part, weight=self.weight)
                self.tensor_part_container.register_processed_part(
                    peer_index, part_index, self._local_average(peer_index, part_index, averaged_part, tensor_part))
            return
        try:
            done_sending = asyncio.Event()
            inputs_aiter = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs_aiter)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()

            def _try_deserialize(msg):
                if msg.code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(msg.code)}")
                return deserialize_torch_tensor(msg.tensor_part), msg

            part_index = 0
            async for averaged, _ in amap_in_executor(_try_deserialize, aiter_with_timeout(stream, self.reducer_timeout),
                                                      max_prefetch=self.tensor_part_container.prefetch):
                self.tensor_part_container.register_processed_part(peer_index, part_index, averaged)
                part_index += 1
            expected = self.tensor_part_container.num_parts_by_peer[peer_index]
            if part_index != expected:
                raise AllreduceException(f"peer {peer_id} sent {part_index} parts, but we expected {expected}")
        except BaseException:
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise

    async def _generate_input_for_peer(self, peer_index: int):
        # hivemind's messages, counted: a peer failing while sending dies once half its parts are on the wire.
        async for message in super()._generate_input_for_peer(peer_index):
            yield message
            self._parts_sent += 1  # the consumer asks for the next one: this one was handed to the stream
            if self.fault_phase == "sending" and self._parts_sent >= max(1, self._parts_to_send // 2):
                die(self.peer_pid)
        self._sends_left -= 1
        if self._sends_left == 0:
            self._sends_done.set()

    async def _fail_reducing(self) -> None:
        """A peer failing while reducing: once its own parts are all sent, before it returns any average."""
        try:
            await asyncio.wait_for(self._sends_done.wait(), self.reducer_timeout)
        finally:
            die(self.peer_pid)

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        # hivemind's method, sending the average instead of the delta (unless averages_on_wire is off).
        part_index = 0
        try:
            loop = asyncio.get_event_loop()
            async for tensor_part, weight, part_compression in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight, msg.tensor_part.compression),
                stream, max_prefetch=self.tensor_part_container.prefetch,
            ):
                if self.drop_after_first_part and part_index >= 1:
                    break  # the injected fault: the rest of this sender's parts never arrive
                try:
                    averaged_part = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight)
                    part_index += 1
                except BannedException:
                    break  # the sender was banned: its parts are no longer needed
                if self.fault_phase == "reducing":
                    await self._fail_reducing()
                sent = averaged_part if self.averages_on_wire else averaged_part - tensor_part
                serialized = await loop.run_in_executor(None, lambda: serialize_torch_tensor(sent, part_compression))
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    def report(self) -> tuple[float, set]:
        """The fraction of the vector received averaged, and the peers whose part or contribution is missing."""
        container = self.tensor_part_container
        missing = {self.ordered_peer_ids[i] for i in self.failed_reducers} | set(self.banned_senders)
        return 1.0 - container.failed_size / container.total_size, missing


class FaultHook:
    """Faults on a hivemind averager, for its next round. `drop_parts_once()` (tests) makes this peer, as a reducer,
    take only the first part of every other sender's share and drop the rest, as when a connection breaks
    mid-stream. The senders then keep their own values for that share (hivemind logs "Averaging: received X%
    results") and this peer averages that share without them. `fail_next_round(phase, peer_pid)`: an exchange fault
    (`cluster.real.exchange_faults`); `take_fired()` says which fired since, and disarms one that did not."""

    _drop_next_round = False
    _phase_next_round: tuple[str, int] | None = None
    _fired: tuple[str, ...] = ()

    def drop_parts_once(self) -> None:
        self._outer_pipe.send(("_arm_fault", [], {}))  # runs in the averager's process, before the next round

    async def _arm_fault(self) -> None:
        self._drop_next_round = True

    def _take_fault(self) -> bool:
        drop, self._drop_next_round = self._drop_next_round, False
        return drop

    def fail_next_round(self, phase: str, peer_pid: int) -> None:
        self._outer_pipe.send(("_arm_phase", [phase, peer_pid], {}))

    async def _arm_phase(self, phase: str, peer_pid: int) -> None:
        self._phase_next_round = (phase, peer_pid)

    def _take_phase(self) -> tuple[str, int] | None:
        armed, self._phase_next_round = self._phase_next_round, None
        if armed is not None:
            self._fired = (*self._fired, armed[0])
        return armed

    def take_fired(self) -> tuple[str, ...]:
        """The exchange faults this averager played since the last call (phases, in order); one armed but not played
        is dropped."""
        future = MPFuture()
        self._outer_pipe.send(("_take_fired", [], dict(future=future)))
        return future.result()

    async def _take_fired(self, future: MPFuture) -> None:
        fired, self._fired, self._phase_next_round = self._fired, (), None
        future.set_result(fired)


class PhaseFaults(FaultHook):
    """A swarm averager (hivemind's protocol) whose rounds go through `ExactAllReduceRunner`, with the faults of
    `FaultHook`; `_round_done(runner)` sees each round that ended."""

    _step_control = None  # the step under way, in the averager's process: what a cancelling peer ends

    async def _step(self, *, step, future_for_init):
        self._step_control = step
        return await super()._step(step=step, future_for_init=future_for_init)

    def _round_done(self, runner: ExactAllReduceRunner) -> None:
        pass

    def _play_start_fault(self, runner: ExactAllReduceRunner) -> None:
        """The faults played once the group has formed and the parts are assigned: `before` and `cancel`."""
        if runner.fault_phase == "before":
            die(runner.peer_pid)
        if runner.fault_phase == "cancel":
            # hivemind's CANCEL: the senders get CANCELLED for this peer's part; it sends nothing and its step ends
            # in an error (set here, so that hivemind does not retry it), leaving its own tensors as they were.
            runner.finalize(cancel=True)
            if self._step_control is not None and not self._step_control.done():
                self._step_control.set_exception(AllreduceException("the peer cancelled its part of the round"))
            raise AllreduceException("cancelled by an exchange fault")

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        # hivemind's method, with the runner that reports, drops parts and fails.
        runner = _start_runner(self, tensors, group_info, group_id, False, kwargs)
        self._play_start_fault(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, update in azip(as_aiter(*tensors), runner):
                tensor.add_(update, alpha=self._averaging_alpha)
                self.last_updated = get_dht_time()
                self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")
        self._round_done(runner)


class ExactAverager(PhaseFaults, DecentralizedAverager):
    """A `DecentralizedAverager` whose rounds end on identical bits everywhere and whose `step(gather=worker)` returns
    a `RoundReport` (None if no group was found), with the exchange faults of `PhaseFaults` (a lockstep peer's,
    `cluster.real.lockstep_churn`)."""

    _last_report: tuple[float, set] | None = None  # set in the averager's process by the round it just ran

    async def _aggregate_with_group(self, group_info, min_vector_size: int, **kwargs):
        self._last_report = None
        started = time.perf_counter()
        worker_of = await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)  # peer -> its gather
        fraction, missing = self._last_report
        return RoundReport(tuple(worker_of[p] for p in group_info.peer_ids), fraction,
                           tuple(sorted(worker_of[p] for p in missing)), time.perf_counter() - started)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        # hivemind's method with the runner above, copying the averages in instead of adding deltas.
        runner = _start_runner(self, tensors, group_info, group_id, True, kwargs)
        self._play_start_fault(runner)
        assert runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX, "lockstep peers all average"
        async for tensor, averaged in azip(as_aiter(*tensors), runner):
            tensor.copy_(averaged)
        self._last_report = runner.report()


class SwarmGradientAverager(SecretSchema, PhaseFaults, GradientAverager):
    """hivemind.Optimizer's gradient averager, on hivemind's own protocol (outside peers join a swarm), keeping for
    each round the fraction of the vector received and the peers missing (`take_reports`), with the faults of
    `PhaseFaults`; its schema hash is bound to the run secret (`run_secret=`, `SecretSchema`)."""

    _reports: list[tuple[float, tuple[str, ...], tuple[str, ...]]] = []

    def take_reports(self) -> list[tuple[float, tuple[str, ...], tuple[str, ...]]]:
        """The rounds run since the last call: (fraction received, base58 ids of the peers missing, base58 ids of the
        group's peers), in order."""
        future = MPFuture()
        self._outer_pipe.send(("_take_reports", [], dict(future=future)))
        return future.result()

    async def _take_reports(self, future: MPFuture) -> None:
        reports, self._reports = self._reports, []
        future.set_result(reports)

    def _round_done(self, runner: ExactAllReduceRunner) -> None:
        fraction, missing = runner.report()
        self._reports = [*self._reports, (fraction, tuple(sorted(p.to_base58() for p in missing)),
                                          tuple(sorted(p.to_base58() for p in runner.ordered_peer_ids)))]


def _start_runner(averager, tensors, group_info, group_id, averages_on_wire: bool, kwargs) -> ExactAllReduceRunner:
    group_id = group_info.group_id if group_id is None else group_id
    runner = ExactAllReduceRunner(p2p=averager._p2p, servicer_type=type(averager), prefix=averager.prefix,
                                  tensors=tensors, group_id=group_id, ordered_peer_ids=group_info.peer_ids,
                                  averages_on_wire=averages_on_wire, drop_after_first_part=averager._take_fault(),
                                  fault=averager._take_phase() if isinstance(averager, PhaseFaults) else None,
                                  **kwargs)
    assert group_id in averager._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
    averager._running_groups[group_id].set_result(runner)
    return runner
