"""The test suite, one folder per package of the house (tests/<package>/test_<behaviour>.py); helpers in support/."""
