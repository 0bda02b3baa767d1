// Stands in for the CUDA header of the same name when llmint8.cu is built for the CPU (cpu_emulation.h).
#pragma once
#include "../cpu_emulation.h"
