// The rule of mira_kernels/_config.py for the MIRA_* variables the C++ kernels read themselves
// (MIRA_CPU_ISA, MIRA_CPU_STREAM): surrounding ASCII whitespace stripped, choices case-insensitive,
// unset or empty = the default, on/off switches spelled 1/true/yes/on or 0/false/no/off, anything
// else a ValueError naming the variable, the value and the allowed values. That file is the one
// place the variables are documented; tests/test_config_env.py runs one table of values through both.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <string_view>

namespace mira {

// The canonical value of variable `name`: one of `choices` ("1" / "0" stand for on / off).
// Read at every call. Tried: each value kept until the environment's array of variable pointers
// changed, instead of getenv's four scans per forward; the op's entry phase inside a running
// ViT-B/16 (batch 1, Zen 5, three runs alternated with this code, 2026-12-06) read 5.9-7.1 us
// before and 6.2-8.0 after. Not kept. Timestamps inside the call (same setting, 2026-12-07) say
// why: the first read of a call (active_table) takes 3.2 us and the second 0.1; with the pointer
// check, 2.7 and 0.7. The first read's time is the cold code and data on its way, not the scan.
inline std::string env_choice(const char* name, const char* fallback, std::initializer_list<std::string_view> choices) {
  const char* raw = std::getenv(name);
  std::string value = raw ? raw : "";
  const auto not_space = [](unsigned char c) { return !std::isspace(c); };
  value.erase(value.begin(), std::find_if(value.begin(), value.end(), not_space));
  value.erase(std::find_if(value.rbegin(), value.rend(), not_space).base(), value.end());
  if (value.empty()) return fallback;
  std::transform(value.begin(), value.end(), value.begin(), [](unsigned char c) { return std::tolower(c); });
  const bool is_switch = std::find(choices.begin(), choices.end(), "1") != choices.end();
  if (is_switch && (value == "1" || value == "true" || value == "yes" || value == "on")) return "1";
  if (is_switch && (value == "0" || value == "false" || value == "no" || value == "off")) return "0";
  for (std::string_view c : choices)
    if (value == c) return value;
  std::string allowed;
  for (std::string_view c : choices)
    if (c != "1" && c != "0") allowed += (allowed.empty() ? "" : ", ") + std::string(c);
  if (is_switch) allowed += ", on or off (1/true/yes/on or 0/false/no/off)";
  TORCH_CHECK_VALUE(false, name, "='", raw, "' is not valid; expected ", allowed,
                    " (case and surrounding whitespace are ignored)");
}

}  // namespace mira
