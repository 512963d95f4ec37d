"""SIGTERM and SIGINT during training: finish the step, save it, stop.

  stop = StopSignals().install()   # around the training loop
  try:
    ...
    if stop.signum is not None:    # after a step: save it, then
      raise Stopped(stop.signum, step, directory)
  finally:
    stop.uninstall()

The command line prints `Stopped` as one line and exits with 128 + the signal
number (143 for SIGTERM, 130 for SIGINT), as a process killed by the signal
would report itself: a scheduler sees a run that did not finish, and requeues
or retries it (a resumed run goes on from the saved step). A second signal of
the same kind while the step finishes acts at once, as it would without the
handlers (SIGTERM kills; SIGINT raises KeyboardInterrupt).

Only single-process runs install the handlers: in a multi-process run the
processes would stop at different steps and wait for each other forever; there
a signal ends the process as usual and the run resumes from its last periodic
checkpoint.
"""

import signal
import threading
from typing import Any

import jax
from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
  """Training stopped on a signal after saving the checkpoint of `step`."""

  def __init__(self, signum: int, step: int, directory: str):
    super().__init__(signum, step, directory)
    self.signum, self.step, self.directory = signum, step, directory

  @property
  def exit_status(self) -> int:
    return 128 + self.signum

  def __str__(self) -> str:
    return (
      f'stopped by {signal.Signals(self.signum).name} after step {self.step}; its '
      f'checkpoint is saved in {self.directory}. Run the same command again to resume.'
    )


class StopSignals:
  """Between `install` and `uninstall` (or in a `with` block), SIGTERM and SIGINT
  only set `signum`."""

  def __init__(self):
    self.signum: int | None = None
    self._announced = False
    self._previous: dict[int, Any] = {}

  def install(self) -> 'StopSignals':
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    self.signum = signum
    signal.signal(signum, self._previous[signum])  # a second one acts at once
    # Nothing is logged here: the handler runs between two bytecodes of the main thread,
    # possibly inside a log handler's write to stderr, and writing to that stream again
    # would be a reentrant call ("--- Logging error ---"). `requested` announces it.

  def requested(self) -> bool:
    """Whether a signal came; the first call after it says so on the terminal."""
    if self.signum is None:
      return False
    if not self._announced:
      self._announced = True
      logging.warning(
        '%s received: saving the checkpoint of the current step, then stopping '
        '(send it again to stop at once).',
        signal.Signals(self.signum).name,
      )
    return True

  def uninstall(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def __enter__(self) -> 'StopSignals':
    return self.install()

  def __exit__(self, *exc_info: Any) -> None:
    self.uninstall()
