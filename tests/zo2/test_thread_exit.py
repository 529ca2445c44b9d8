"""zo2's worker threads are stopped before the interpreter finalizes, even when nothing closed the engine.

A daemon thread still alive at finalization is stopped when it next takes the GIL; inside a C++ frame that
aborts the process ("terminate called without an active exception"). The check: a script that runs an
offloaded step on async copy streams and exits without closing anything; an ``atexit`` handler (which runs
after ``threading``'s exit hooks, before finalization) lists the zo2 threads still alive.
"""

import subprocess
import sys

SCRIPT = """
import atexit, threading
import torch
from torch import nn
import zo2
from zo2.copy_executor import use_async_copies

def report():
    alive = sorted(t.name for t in threading.enumerate() if t.name.startswith("zo2-") and t.is_alive())
    print("ALIVE", ",".join(alive), flush=True)

atexit.register(report)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
opt = zo2.ZOSGD(model.parameters(), lr=0.01, eps=1e-3, seed=0)
engine = zo2.offload(model, opt, device="cpu", blocks=[model[0], model[2]], verbose=False)
use_async_copies(engine)
x, y = torch.randn(4, 6), torch.randn(4, 2)
opt.step(lambda: nn.functional.mse_loss(model(x), y))
started = sorted(t.name for t in threading.enumerate() if t.name.startswith("zo2-"))
print("STARTED", ",".join(started), flush=True)
"""


def test_no_zo2_thread_is_alive_when_the_interpreter_finalizes():
    out = subprocess.run([sys.executable, "-P", "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) if " " in line else (line, "") for line in out.stdout.splitlines())
    started = set(filter(None, lines["STARTED"].split(",")))
    # the script exercises what it means to: half workers and both CPU copy streams were running
    assert {"zo2-upload", "zo2-offload"} <= started and any(n.startswith("zo2-half-") for n in started), started
    assert lines["ALIVE"] == "", f"zo2 threads alive at interpreter finalization: {lines['ALIVE']}"
