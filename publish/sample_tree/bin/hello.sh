#!/bin/sh
# A script published into /cvmfs/demo.example.org; sources its setup next to it.
here=$(dirname "$0")
. "$here/../etc/setup.sh"
echo "hello from $DEMO_RELEASE on $(uname -s)"
