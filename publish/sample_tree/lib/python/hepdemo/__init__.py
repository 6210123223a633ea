"""A tiny package that lives in /cvmfs/demo.example.org/lib/python."""

RELEASE = "demo-1.0"


def greet(name: str) -> str:
    return f"hepdemo {RELEASE} greets {name}"
