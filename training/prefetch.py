"""The next batch read, laid out and put on the mesh while the current step runs."""

import concurrent.futures


class Prefetch:
  """Iterates `put(next(iterator))` one batch ahead, in a background thread.

  `get_state()` is the iterator's state after the batch `__next__` returned last, not
  after the one being prepared: what a checkpoint must save so that a resumed run reads
  exactly the batches an uninterrupted one reads. It has the get_state / set_state /
  start_prefetch methods of grain's checkpoint protocol, so a checkpoint saves it as it
  saves the iterator itself. Restore the iterator before wrapping it.
  """

  def __init__(self, iterator, put):
    self._iterator, self._put = iterator, put
    self._state = iterator.get_state()
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    self._next = self._pool.submit(self._produce)

  def _produce(self):
    host_batch = next(self._iterator)
    return self._put(host_batch), self._iterator.get_state()

  def __iter__(self):
    return self

  def __next__(self):
    batch, self._state = self._next.result()
    self._next = self._pool.submit(self._produce)
    return batch

  def get_state(self):
    return self._state

  def set_state(self, state):
    raise RuntimeError("restore the iterator before wrapping it in Prefetch")

  def start_prefetch(self) -> None:
    pass

  def close(self) -> None:
    self._next.cancel()
    self._pool.shutdown(wait=True)
