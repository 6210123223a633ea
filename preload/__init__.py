"""preload: pull a selected subtree of CVMFS repositories into a local Stratum-1-layout store."""
