"""The teacher as training sees it: live, cached (top-k rows, planning, fidelity), or served (imports config ..
kd)."""
