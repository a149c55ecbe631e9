"""The step-level slot engine: requests join and leave between sampling steps.

A sampling step is one forward over every occupied row followed by one sampler step
(``ops.sampler_step``), and nothing in a forward couples rows, so rows at different steps of
different requests share it. :class:`StepEngine` owns everything about that which does not
depend on what is being sampled; a task subclasses it with four hooks (after vllm-omni's
split of a step scheduler from a model's hooks) and gives it ``cells``, the sampler's cells a
row (the image model's ``n_cells``, N² on its N×N grid; a caption row's word slots):

- ``_check_input(where, request)``: validate a request's task input, return it in host form
  and the number of cells its schedule runs over (at most ``cells``);
- ``_stage(rows)`` / ``_join_rows(j, slot)``: copy the joiners' inputs into static buffers, then
  run the part of the forward no step changes for them (written into their slots);
- ``_forward(b, sample)``: one step's forward over the first b slots, giving the per-cell
  (max probability, id) the sampler reads;
- ``_finished(...)``: a finished row's result.

:class:`xlx_fast.engine.Engine` paints (captions in, cluster ids out);
:class:`xlx_fast.caption_engine.CaptionEngine` writes captions (images in, words out).

What the base does, for any task:

- per-row schedule: the host keeps each row's step i and its schedule (mask count, cell,
  next cell: ``strategies.schedule`` over the row's cells) and writes this step's values as
  int32 data;
- per-row strategy: one sampler launch with a per-row strategy code (``ops.sampler_step``:
  one rule per row, idle slots coded INACTIVE cost nothing and are never written). Chosen over
  grouping rows by strategy because the step then keeps one fixed shape per batch bucket (a
  CUDA graph replays it whatever the mix of strategies) and rows are never gathered/scattered;
- per-row temperature and seed: the head takes a temperature per row (0 = greedy) and a
  Philox key per cell, ``seeds.cell_seeds(seed_key(seed), i)``: a row's noise depends on its
  seed, its step and its cell only; the random order of ``random`` is ``random_order(steps,
  seed)``, per row. Seeds are data: nothing is captured or cached per seed.

A request's result therefore depends only on the request, never on its slot, its neighbours
or when it joined, up to float rounding: a forward's GEMMs are blocked differently at other
batch sizes, so ids are equal wherever the best and second-best probabilities are further
apart than that rounding (SPEC §4).

Batch buckets. The forward runs over the first ``b`` slots, b the smallest bucket holding every
occupied slot (rows are moved down into free low slots first when that makes b smaller: a copy
of the row's cached state). With CUDA graphs the buckets are powers of two up to ``slots`` (a
graph per bucket); without them (the CPU, ``cuda_graph=False``) every size is a bucket, so the
forward covers exactly the occupied rows: on a CPU a padded row costs as much as a real one (6
of 8 slots busy would run 8 rows, a third more work). On CUDA each bucket's step is a CUDA graph
(two per bucket: all rows greedy, or some sampling), and each bucket's joiner pass too, all
captured by ``warmup()`` and replayed with the per-row data as inputs; after ``warmup`` nothing
is captured. The host uploads this step's per-row data (int32 [b, 5], and int64 [b, cells] seeds
when a row samples) through pinned staging buffers, and syncs only when rows finish or are
cancelled (to copy their results out) -- finishing is known on the host from each row's step
count.

Memory: per slot the task's cache, the sampler state (cells x D), the mask history
(``MAX_STEPS`` x cells bools: 1 MB a slot at 1,024 cells), plus the step's activations at the
bucket size.

Synchronous and not thread-safe: one owner calls ``admit``/``step``/``cancel``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .ops.sampler_args import describe_status
from .ops.sampler_step import SamplerState, init_state, sampler_step
from .sampling_params import check_params
from .seeds import cell_seeds, seed_key
from .strategies import INACTIVE, MAX_STEPS, schedule

__all__ = ["StepEngine", "Row", "MAX_STEPS", "check_model", "run_requests"]

# rows of the per-row control array (int32 [5, rows]: each field contiguous over rows)
_STRAT, _COUNT, _CELL, _NEXT, _STEP = range(5)


@dataclass
class Row:
    """Host-side state of one occupied slot. ``data``: the task's checked input."""

    handle: int
    request: object
    steps: int
    code: int
    count: list | None
    cell: list | None
    next_cell: list | None
    key: int
    temperature: float
    data: object
    step: int = 0
    cancelled: bool = False


def _default_buckets(slots: int, cuda_graph: bool) -> list[int]:
    """Powers of two up to ``slots`` for graphs (few captures); every size 1..slots without."""
    if not cuda_graph:
        return list(range(1, slots + 1))
    out, b = [], 1
    while b < slots:
        out.append(b)
        b *= 2
    return out + [slots]


def check_model(model) -> torch.device:
    """An image model in eval mode on a CPU or CUDA device (every engine's first check);
    returns its device."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "centroids"):
        raise TypeError(f"model must be an XLxmertForImageGeneration, got {type(model).__name__}")
    if model.training:
        raise ValueError("the engine runs inference only: call model.eval() first")
    device = model.centroids.device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the engine runs on cpu or cuda, the model is on {device}")
    return device


def run_requests(engine: "StepEngine", requests: list, progress_total: int | None = None,
                 desc: str = "xlx_fast") -> list:
    """Admit ``requests`` into an empty ``engine``, step until each finished, and return their
    results in request order (what ``generate`` and ``caption`` do with ``slots = B``).
    ``progress_total``: steps of a progress bar (None: no bar). The engine is left empty even
    when a step raises. A row the sampler flagged raises ValueError naming its index."""
    handles = engine.admit(requests)
    row_of = {id(q): r for r, q in enumerate(requests)}
    results = [None] * len(requests)
    bar = None
    if progress_total is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=progress_total, desc=desc, unit="step")
    try:
        while engine.active():
            for f in engine.step():
                results[row_of[id(f.request)]] = f
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
        for h in handles:  # leave the (cached) engine empty even after an error
            engine.cancel(h)
        while engine.active():
            engine.step()
    for r, f in enumerate(results):
        if f.error is not None:  # a flagged row has no result to return
            raise ValueError(f"row {r}: {f.error}")
    return results


class StepEngine:
    """See the module docstring. Subclasses call ``__init__`` with the sampler's ``table`` [K, D]
    and ``mask_row`` [D] (what a decided and a masked cell read next step) and ``cells``, the
    cells of a row (1..1024), after setting ``self.model`` and ``self.device``, and implement
    the hooks."""

    request_type: type = object

    def __init__(self, slots: int, *, cuda_graph, buckets, table: torch.Tensor,
                 mask_row: torch.Tensor, cells: int):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an int >= 1, got {slots!r}")
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs a model on a CUDA device")
        if buckets is None:
            buckets = _default_buckets(slots, bool(cuda_graph))
        buckets = sorted(set(buckets))
        if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets) \
                or buckets[-1] != slots:
            raise ValueError(f"buckets must be ints >= 1 ending at slots ({slots}), got {buckets}")
        self.slots, self.buckets, self.cuda_graph = slots, buckets, bool(cuda_graph)
        self.table, self.mask_row = table, mask_row
        dev = self.device
        rows = slots + 1  # row `slots` is scratch: padded joiners write there, no step reads it
        self.state = init_state(rows, mask_row, cells=cells)  # checks cells (1..1024)
        self.cells = cells
        self.hist = torch.zeros(rows, MAX_STEPS, cells, dtype=torch.bool, device=dev)
        self.probs = torch.zeros(rows, cells, dtype=torch.float32, device=dev)
        self.ctl = torch.zeros(5, rows, dtype=torch.int32, device=dev)
        self.ctl[_STRAT] = INACTIVE
        self.cell_seed = torch.zeros(rows, cells, dtype=torch.int64, device=dev)
        self.temps = torch.zeros(rows, cells, dtype=torch.float32, device=dev)
        self.row_index = torch.arange(rows, device=dev)
        # joiners' staging (the join pass runs on the first j of these)
        self.join_slot = torch.full((slots,), slots, dtype=torch.int64, device=dev)
        self.join_temps = torch.zeros(slots, cells, dtype=torch.float32, device=dev)
        self._rows: list[Row | None] = [None] * slots
        self._by_handle: dict[int, int] = {}
        self._next_handle = 0
        self._pending: list = []
        self._graphs: dict = {}
        self._join_graphs: dict = {}
        self._warm = False
        self.captures = 0  # graphs captured so far (tests: nothing is captured after warmup)
        if dev.type == "cuda":
            self._staging = [(torch.zeros(5, rows, dtype=torch.int32).pin_memory(),
                              torch.zeros(rows, cells, dtype=torch.int64).pin_memory(),
                              torch.cuda.Event()) for _ in range(4)]
            self._stage_i = 0

    # ---------------------------------------------------------------- hooks
    def _check_input(self, where: str, request) -> tuple[object, int]:
        """(the request's checked task input, the number of cells its schedule runs over: at
        most ``self.cells``)."""
        raise NotImplementedError

    def _stage(self, rows: list[Row]) -> None:
        """Copy the joiners' inputs into the static join buffers (rows 0..j-1)."""
        raise NotImplementedError

    def _join_rows(self, j: int, slot: torch.Tensor) -> None:
        """The per-request part of the forward for the first j joiners, into their slots
        (after the base reset their sampler state to step 0). Capturable."""
        raise NotImplementedError

    def _row_buffers(self) -> tuple[torch.Tensor, ...]:
        """The task's per-slot tensors (dim 0 = slot), moved with a row in compaction."""
        raise NotImplementedError

    def _forward(self, b: int, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred_prob f32 [b, cells], pred_id int64 [b, cells]) of one step over the first b slots."""
        raise NotImplementedError

    def _finished(self, row: Row, ids: torch.Tensor, probs: torch.Tensor, masks: torch.Tensor,
                  extra, error: str | None):
        """The result of a finished (or cancelled, or flagged) row; ``extra`` is
        ``_finish_extra``'s entry for it."""
        raise NotImplementedError

    def _finish_extra(self, idx: torch.Tensor, ids: torch.Tensor) -> list | None:
        """Per finishing row, anything the result needs from the device (default: nothing)."""
        return None

    # ---------------------------------------------------------------- occupancy
    def free_slots(self) -> int:
        return sum(r is None for r in self._rows)

    def active(self) -> int:
        return self.slots - self.free_slots()

    # ---------------------------------------------------------------- validation
    def _check(self, i: int, r) -> Row:
        where = f"requests[{i}]"
        if not isinstance(r, self.request_type):
            raise TypeError(f"{where} must be an {self.request_type.__module__}."
                            f"{self.request_type.__name__}, got {type(r).__name__}")
        data, n_cells = self._check_input(where, r)
        if not 1 <= n_cells <= self.cells:  # the task's own bug, not the request's
            raise RuntimeError(f"{type(self).__name__}._check_input gave {n_cells} cells, outside "
                               f"the engine's 1..{self.cells}")
        p = check_params(r.strategy, r.steps, r.temperature, r.seed, n_cells, where=f"{where}.")
        sched = schedule(p.strategy.name, p.steps, p.seed, n_cells)
        return Row(handle=-1, request=r, steps=p.steps, code=p.strategy.code, count=sched.count,
                   cell=sched.cell, next_cell=sched.next_cell, key=seed_key(p.seed),
                   temperature=p.temperature, data=data)

    # ---------------------------------------------------------------- admit
    @torch.no_grad()
    def admit(self, requests: Sequence) -> list[int]:
        """Validate every request first (nothing is admitted if one is bad), place them in free
        slots (the lowest first), run the join pass for the joiners only. Returns one handle
        per request."""
        if isinstance(requests, self.request_type) or not isinstance(requests, (list, tuple)):
            raise TypeError(f"requests must be a list or tuple of {self.request_type.__name__}")
        rows = [self._check(i, r) for i, r in enumerate(requests)]
        if len(rows) > self.free_slots():
            raise ValueError(f"requests: {len(rows)} requests but only {self.free_slots()} free "
                             f"slot(s) of {self.slots}")
        if not rows:
            return []
        free = [s for s, r in enumerate(self._rows) if r is None][:len(rows)]
        j = len(rows)
        temps = torch.zeros(j, self.cells, dtype=torch.float32)
        for n, row in enumerate(rows):
            temps[n] = row.temperature
        jb = self._bucket(j) if self.cuda_graph else j
        self.join_temps.zero_()
        self.join_slot.fill_(self.slots)
        self.join_temps[:j].copy_(temps)
        self.join_slot[:j].copy_(torch.tensor(free, dtype=torch.int64))
        self._stage(rows)
        if self.cuda_graph:
            if jb not in self._join_graphs:
                self._join_graphs[jb] = self._capture(lambda: self._join(jb))
            self._join_graphs[jb].replay()
        else:
            self._join(jb)
        handles = []
        for slot, row in zip(free, rows):
            row.handle = self._next_handle
            self._next_handle += 1
            self._rows[slot] = row
            self._by_handle[row.handle] = slot
            handles.append(row.handle)
        return handles

    def _join(self, j: int) -> None:
        """The first j joiners: sampler state reset to step 0, then the task's join pass. Plain
        tensor ops on static buffers: capturable."""
        slot = self.join_slot[:j]
        self.temps.index_copy_(0, slot, self.join_temps[:j])
        st = self.state
        st.mask.index_fill_(0, slot, True)
        st.visited.index_fill_(0, slot, False)
        st.ids.index_fill_(0, slot, -1)
        st.status.index_fill_(0, slot, 0)
        st.out.index_copy_(0, slot, self.mask_row.view(1, 1, -1).expand(j, self.cells, -1))
        self._join_rows(j, slot)

    # ---------------------------------------------------------------- cancel
    def cancel(self, handle: int) -> None:
        """Free the request's slot at the next step boundary (its result has cancelled=True).
        A handle that already finished is ignored; one never issued is a ValueError."""
        if isinstance(handle, bool) or not isinstance(handle, int):
            raise TypeError(f"handle must be an int, got {type(handle).__name__}")
        if not 0 <= handle < self._next_handle:
            raise ValueError(f"handle {handle} was never issued by this engine")
        slot = self._by_handle.get(handle)
        if slot is not None:
            self._rows[slot].cancelled = True

    # ---------------------------------------------------------------- step
    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _compact(self) -> int:
        """Move rows into low free slots until the occupied slots fit the smallest bucket;
        returns that bucket."""
        b = self._bucket(self.active())
        high = [s for s in range(b, self.slots) if self._rows[s] is not None]
        if high:
            low = [s for s in range(b) if self._rows[s] is None][:len(high)]
            src = torch.tensor(high, device=self.device)
            dst = torch.tensor(low, device=self.device)
            st = self.state
            for t in (*self._row_buffers(), st.mask, st.visited, st.ids, st.out, st.status,
                      self.hist, self.probs, self.temps):
                t.index_copy_(0, dst, t.index_select(0, src))
            for s, d in zip(high, low):
                row = self._rows[s]
                self._rows[d], self._rows[s] = row, None
                self._by_handle[row.handle] = d
        return b

    def _core(self, b: int, sample: bool) -> list[int]:
        """One forward over the first b rows and the sampler step. Plain tensor ops and the
        custom ops on static buffers, no host sync: capturable. Returns the slots the sampler
        flagged on a CPU ([] elsewhere: a GPU's flags are read when the row finishes)."""
        st = self.state
        ctl = self.ctl[:, :b]
        self.hist[self.row_index[:b], ctl[_STEP].long()] = st.mask[:b]
        prob, pred_id = self._forward(b, sample)
        view = SamplerState(st.mask[:b], st.visited[:b], st.ids[:b], st.out[:b], st.status[:b])

        def sample_step():
            sampler_step(prob, pred_id, view, self.table, self.mask_row, ctl[_STRAT],
                         count=ctl[_COUNT], cell=ctl[_CELL], next_cell=ctl[_NEXT])

        flagged = []
        try:
            sample_step()
        except ValueError:
            # The C++ twin refuses the whole batch for one bad row, writing only the bad rows'
            # status: those rows stop here (the caller frees them with their error) and the step
            # is rerun for the others on the same probabilities, so they advance as if alone.
            if self.device.type != "cpu":
                raise
            status = st.status[:b].tolist()
            flagged = [s for s in range(b) if self._rows[s] is not None and status[s]]
            if not flagged:
                raise
            ctl[_STRAT, flagged] = INACTIVE
            if len(flagged) < sum(r is not None for r in self._rows[:b]):
                sample_step()
        self.probs[:b].copy_(prob)
        return flagged

    def _capture(self, fn):
        """A CUDA graph of fn (after one eager run on a side stream that also compiles kernels)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        self.captures += 1
        return graph

    @torch.no_grad()
    def warmup(self) -> None:
        """On CUDA: capture every bucket's step (greedy and sampling) and joiner pass, so that
        no capture happens during traffic. Must be called while the engine is empty. On CPU:
        nothing to prepare (a no-op)."""
        if self.active():
            raise ValueError("warmup() must run before any request is admitted")
        if not self.cuda_graph:
            self._warm = True
            return
        self.ctl[_STRAT] = INACTIVE
        self.ctl[_STEP] = 0
        for b in self.buckets:
            for sample in (False, True):
                if (b, sample) not in self._graphs:
                    self._graphs[b, sample] = self._capture(lambda b=b, s=sample: self._core(b, s))
            if b not in self._join_graphs:
                self.join_slot.fill_(self.slots)  # warm-up runs write only the scratch row
                self._join_graphs[b] = self._capture(lambda b=b: self._join(b))
        torch.cuda.current_stream(self.device).synchronize()
        self._warm = True

    def _upload(self, b: int, ctl: np.ndarray, seeds: np.ndarray | None) -> None:
        if self.device.type != "cuda":
            self.ctl[:, :b].copy_(torch.from_numpy(ctl))
            if seeds is not None:
                self.cell_seed[:b].copy_(torch.from_numpy(seeds))
            return
        # pinned ring: the buffer reused now was copied from 4 steps ago (its event is long done)
        host_ctl, host_seed, event = self._staging[self._stage_i]
        self._stage_i = (self._stage_i + 1) % len(self._staging)
        if not event.query():  # practically never: the copy was enqueued 4 steps ago
            event.synchronize()
        # the whole [5, rows] block: one contiguous pinned copy (rows past b: idle)
        block = host_ctl.numpy()
        block[:] = 0
        block[_STRAT] = INACTIVE
        block[:, :b] = ctl
        self.ctl.copy_(host_ctl, non_blocking=True)
        if seeds is not None:
            host_seed[:b].numpy()[:] = seeds
            self.cell_seed[:b].copy_(host_seed[:b], non_blocking=True)
        event.record(torch.cuda.current_stream(self.device))

    @torch.no_grad()
    def step(self) -> list:
        """One forward over the occupied slots; each row advances by one of ITS steps; rows that
        finished (or were cancelled) are returned and their slots freed. [] when empty.

        A row the sampler flags (NaN probabilities) is returned with ``error`` set, never raised:
        on a CPU at the step that flagged it, on a GPU when it finishes (its flag is read then,
        with the results: no extra sync). The other rows go on as if it had never been there."""
        out, self._pending = self._pending, []
        try:
            return self._step(out)
        except ValueError:
            self._pending = out + self._pending  # rows already finished are not lost
            raise

    def _step(self, out: list) -> list:
        cancelled = [s for s, r in enumerate(self._rows) if r is not None and r.cancelled]
        if cancelled:
            out += self._finish(cancelled)
        if not self.active():
            return out
        b = self._compact()
        ctl = np.zeros((5, b), dtype=np.int32)
        ctl[_STRAT] = INACTIVE
        sample = any(r is not None and r.temperature > 0 for r in self._rows[:b])
        seeds = np.zeros((b, self.cells), dtype=np.int64) if sample else None
        for s, row in enumerate(self._rows[:b]):
            if row is None:
                continue
            i = row.step
            ctl[:, s] = (row.code, row.count[i] if row.count else 0, row.cell[i] if row.cell else -1,
                      row.next_cell[i] if row.next_cell else -1, i)
            if sample and row.temperature > 0:
                seeds[s] = cell_seeds(row.key, i, self.cells)
        self._upload(b, ctl, seeds)
        flagged = []
        if self.cuda_graph:
            graph = self._graphs.get((b, sample))
            if graph is None:
                graph = self._graphs[b, sample] = self._capture(lambda: self._core(b, sample))
            graph.replay()
        else:
            flagged = self._core(b, sample)
        done = []
        for s, row in enumerate(self._rows[:b]):
            if row is not None:
                if s in flagged:
                    done.append(s)
                    continue
                row.step += 1
                if row.step == row.steps:
                    done.append(s)
        if done:
            out += self._finish(done)
        return out

    def _finish(self, slots: list[int]) -> list:
        """Copy the rows' results to the host (the step's one sync) and free their slots."""
        idx = torch.tensor(slots, device=self.device)
        st = self.state
        extra = self._finish_extra(idx, st.ids.index_select(0, idx))
        # four copies queued (into pinned memory on CUDA), then one wait for all of them
        ids, probs, hist, status = (t.index_select(0, idx).to("cpu", non_blocking=True)
                                    for t in (st.ids, self.probs, self.hist, st.status))
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        finished = []
        for n, s in enumerate(slots):
            row = self._rows[s]
            self._rows[s] = None
            del self._by_handle[row.handle]
            code = int(status[n])
            error = None if not code else (f"sampler step flagged request {row.handle}: "
                                           f"{describe_status(code)} (check the model's weights for NaN)")
            finished.append(self._finished(row, ids[n], probs[n], hist[n, :row.step],
                                           None if extra is None else extra[n], error))
        return finished
