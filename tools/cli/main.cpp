#include <cstdio>
int main() { std::puts("gemma3"); return 0; }
