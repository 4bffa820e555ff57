-- Commands only; nothing starts until require("localcoder").setup{...} is called.
if vim.g.loaded_localcoder then
  return
end
vim.g.loaded_localcoder = true

local function cmd(name, fn, desc)
  vim.api.nvim_create_user_command(name, fn, { desc = desc })
end

cmd("LocalcoderToggle", function()
  require("localcoder").toggle()
end, "localcoder: turn completions on/off")
cmd("LocalcoderStats", function()
  print(vim.inspect(require("localcoder").stats()))
end, "localcoder: show acceptance and latency counters")
cmd("LocalcoderDocstring", function()
  require("localcoder").docstring()
end, "localcoder: generate a docstring for the function under the cursor")
cmd("LocalcoderStart", function()
  require("localcoder").attach(0)
end, "localcoder: start/attach the language server to this buffer")
