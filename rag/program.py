"""Process-wide settings of the project's own programs (`rag`, `index_builder`, `rag-train`, `rag-eval`), imported
first by each program's module, before torch loads. A library import (`import rag`) changes nothing of the
process: a user's program keeps its own settings.

OpenMP threads that spin while they wait hold a core another process needs: warm answers ran 2x slower beside a busy
process (docs/results.md, "Threads on a shared machine"). The OpenMP runtime reads the policy once, when torch
loads; a user's own OMP_WAIT_POLICY wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
