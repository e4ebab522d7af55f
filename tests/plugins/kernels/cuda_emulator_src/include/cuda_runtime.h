// Stand-in for the CUDA header on a machine without a GPU: see ../emulator.h.
#pragma once
#include "../emulator.h"
