"""FrameTable: preallocated shared memory holding one input and one output frame per stream slot.

Pixels cross between media workers and the engine process here, never through a pipe. The input side needs
no lock: a media worker writes a slot's input only after the engine asked for the stream's next frame, and
the engine reads it once, before asking again. The output side is a sequence lock: the engine marks a slot
busy (-1) while it writes, then stores the frame's sequence number; a reader copies and keeps the copy only
if the number is still the one it was told (otherwise a newer frame replaced it, and its notice follows).
"""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

_HEADER_FIELDS = 2  # int64 per slot: [input sequence, output sequence]
_OUT_SEQ = 1
_WRITING = -1


@dataclass(frozen=True)
class FrameTableLayout:
    """Enough to attach to a table from another process."""

    name: str
    slots: int
    resolution: int

    @property
    def frame_bytes(self) -> int:
        return self.resolution * self.resolution * 3

    @property
    def size(self) -> int:
        return self.slots * (_HEADER_FIELDS * 8 + 2 * self.frame_bytes)


class FrameTable:
    """Views of a shared-memory segment: headers (slots, 2) int64, inputs and outputs (slots, res, res, 3)."""

    def __init__(self, shm: shared_memory.SharedMemory, layout: FrameTableLayout, owner: bool) -> None:
        self._shm = shm
        self.layout = layout
        self.owner = owner
        n, res = layout.slots, layout.resolution
        buf = shm.buf
        header_bytes = n * _HEADER_FIELDS * 8
        self.headers = np.ndarray((n, _HEADER_FIELDS), np.int64, buf, 0)
        self.inputs = np.ndarray((n, res, res, 3), np.uint8, buf, header_bytes)
        self.outputs = np.ndarray((n, res, res, 3), np.uint8, buf, header_bytes + n * layout.frame_bytes)

    @classmethod
    def create(cls, slots: int, resolution: int) -> FrameTable:
        layout = FrameTableLayout("", slots, resolution)
        shm = shared_memory.SharedMemory(create=True, size=layout.size)
        table = cls(shm, FrameTableLayout(shm.name, slots, resolution), owner=True)
        table.headers[:] = 0
        return table

    @classmethod
    def attach(cls, layout: FrameTableLayout) -> FrameTable:
        # Python < 3.13 registers an attached segment with the resource tracker too. That is harmless here:
        # every process that attaches was spawned by the creator and shares its tracker, which unlinks
        # leftovers only when the creator's process tree is gone; the creator unlinks it in close().
        return cls(shm=shared_memory.SharedMemory(name=layout.name), layout=layout, owner=False)

    def write_input(self, slot: int, seq: int, frame: np.ndarray) -> None:
        self.inputs[slot] = frame
        self.headers[slot, 0] = seq

    def read_input(self, slot: int) -> np.ndarray:
        return self.inputs[slot].copy()

    def write_output(self, slot: int, seq: int, frame: np.ndarray) -> None:
        self.headers[slot, _OUT_SEQ] = _WRITING
        self.outputs[slot] = frame
        self.headers[slot, _OUT_SEQ] = seq

    def read_output(self, slot: int, seq: int) -> np.ndarray | None:
        """The output frame `seq` of `slot`, or None when a newer frame already replaced it."""
        if self.headers[slot, _OUT_SEQ] != seq:
            return None
        frame = self.outputs[slot].copy()
        return frame if self.headers[slot, _OUT_SEQ] == seq else None

    def close(self) -> None:
        # The numpy views hold exports of the buffer; drop them before closing the mapping.
        del self.headers, self.inputs, self.outputs
        self._shm.close()
        if self.owner:
            self._shm.unlink()
