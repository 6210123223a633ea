#include <stdio.h>
int main(void) { puts("hello from a compiled program in /cvmfs"); return 0; }
