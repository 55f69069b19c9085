"""A chat template written for this project that renders conversations the way Qwen3's does.

Behaviour (ChatML with Qwen3's thinking rules):
- `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn; a leading system message opens the prompt.
- With `tools`, the system turn lists each tool's JSON schema inside <tools></tools> and asks for
  calls as <tool_call>{"name": ..., "arguments": ...}</tool_call>.
- Assistant turns after the last real user question keep their reasoning as
  `<think>\\n...\\n</think>\\n\\n`; earlier assistant turns lose it (Qwen3 drops old thoughts).
- Consecutive `tool` messages become one user turn of <tool_response> blocks.
- `add_generation_prompt` opens an assistant turn; `enable_thinking=false` pre-fills an empty
  `<think>\\n\\n</think>\\n\\n` block so the model answers without thinking.
"""

QWEN3_STYLE_TEMPLATE = r"""
{%- set first_is_system = messages|length > 0 and messages[0].role == 'system' -%}
{%- if tools -%}
  {{- '<|im_start|>system\n' -}}
  {%- if first_is_system -%}{{- messages[0].content ~ '\n\n' -}}{%- endif -%}
  {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
  {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
  {%- for tool in tools -%}{{- '\n' ~ (tool | tojson) -}}{%- endfor -%}
  {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments '
      'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
      '"arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif first_is_system -%}
  {{- '<|im_start|>system\n' ~ messages[0].content ~ '<|im_end|>\n' -}}
{%- endif -%}
{#- The last user turn that is a question rather than wrapped tool output. -#}
{%- set state = namespace(last_query=messages|length - 1) -%}
{%- for m in messages -%}
  {%- if m.role == 'user' and m.content is string
        and not (m.content.startswith('<tool_response>') and m.content.endswith('</tool_response>')) -%}
    {%- set state.last_query = loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
  {%- set content = m.content if m.content is string else '' -%}
  {%- if m.role == 'user' or (m.role == 'system' and not loop.first) -%}
    {{- '<|im_start|>' ~ m.role ~ '\n' ~ content ~ '<|im_end|>\n' -}}
  {%- elif m.role == 'assistant' -%}
    {%- set thought = m.reasoning_content if m.reasoning_content is string else '' -%}
    {%- if m.reasoning_content is not string and '</think>' in content -%}
      {%- set thought = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') -%}
      {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
    {%- endif -%}
    {%- if loop.index0 > state.last_query and (loop.last or thought) -%}
      {{- '<|im_start|>assistant\n<think>\n' ~ thought.strip('\n') ~ '\n</think>\n\n' ~ content.lstrip('\n') -}}
    {%- else -%}
      {{- '<|im_start|>assistant\n' ~ content -}}
    {%- endif -%}
    {%- for call in (m.tool_calls or []) -%}
      {%- if not loop.first or content -%}{{- '\n' -}}{%- endif -%}
      {%- set fn = call.function if call.function is defined else call -%}
      {{- '<tool_call>\n{"name": "' ~ fn.name ~ '", "arguments": ' -}}
      {{- fn.arguments if fn.arguments is string else (fn.arguments | tojson) -}}
      {{- '}\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
  {%- elif m.role == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
    {{- '\n<tool_response>\n' ~ content ~ '\n</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
  {%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}
""".strip()
