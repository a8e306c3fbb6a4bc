// The single doctest main for deltakv_tests; every tests/test_*.cpp is linked into it.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
