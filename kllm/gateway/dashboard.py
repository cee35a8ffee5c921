"""The live dashboard page: one HTML file with no external assets (it works offline),
polling ``/dashboard/data`` every two seconds."""

from importlib.resources import files

PAGE = (files("kllm.gateway") / "dashboard.html").read_text(encoding="utf-8")
