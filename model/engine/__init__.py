"""The inference engine: sequences, KV block manager, scheduler, model runner, sampling, engine.

Bookkeeping (sequence, block_manager, scheduler) is plain Python; every tensor lives in the
model runner. Messages between the engine and the runner ranks are small dataclasses.
"""
