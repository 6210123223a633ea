from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("worker._trap", ["worker/_trap.c"]),
        Extension("worker._tmpfs", ["worker/_tmpfs.c"]),
    ]
)
