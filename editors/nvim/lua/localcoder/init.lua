-- localcoder.nvim: private, local fill-in-the-middle completions from `localcoder lsp`.
--
-- A thin client: all completion logic is in the server. Two display paths:
--   * Neovim 0.12+: the native `vim.lsp.inline_completion` (ghost text, accept with a key);
--   * Neovim 0.7-0.11: our own ghost text with extmarks (virtual text for the first line,
--     virtual lines for the rest), fed by `textDocument/inlineCompletion` requests.
-- The server is started with `vim.lsp.start` (0.8+) or `vim.lsp.start_client` (0.7).
local M = {}

local api = vim.api
local uv = vim.uv or vim.loop
local ns = api.nvim_create_namespace("localcoder")

M.defaults = {
  cmd = { "localcoder", "lsp" },
  filetypes = nil, -- nil: every normal buffer with a file type
  root_markers = { ".git", "pyproject.toml", "package.json", "Cargo.toml", "go.mod" },
  -- server settings (initializationOptions), e.g. { serverUrl = "http://127.0.0.1:8765", maxTokens = 64 }
  init_options = {},
  native = "auto", -- "auto": vim.lsp.inline_completion when available; false: always extmarks
  auto_trigger = true,
  prefetch = true, -- tell the server where the cursor lands (buffer switch, pause after moving): it warms its cache
  debounce_ms = 60, -- client-side debounce of the extmark path (the server debounces too)
  keymaps = {
    accept = "<Tab>",
    accept_word = "<M-Right>",
    accept_line = "<M-Down>",
    dismiss = "<C-]>",
    trigger = "<M-\\>",
  },
}

local config = vim.deepcopy(M.defaults)
local enabled = true
local client_id_07 = nil -- the one client on Neovim 0.7 (no vim.lsp.start to reuse it)
local ghosts = {} -- bufnr -> { text, row, col, id }
local timers = {} -- bufnr -> uv timer
local pending = {} -- bufnr -> request id
local skip_change = {} -- bufnr -> true while we insert accepted text ourselves

local function has(feature)
  return vim.fn.has(feature) == 1
end

-- ---- client ---------------------------------------------------------------------------------------
local function native_available()
  return config.native ~= false and vim.lsp.inline_completion ~= nil
end

local function get_client(bufnr)
  local get = vim.lsp.get_clients or vim.lsp.get_active_clients
  for _, c in ipairs(get({ bufnr = bufnr })) do
    if c.name == "localcoder" then
      return c
    end
  end
  if client_id_07 then
    local c = vim.lsp.get_client_by_id(client_id_07)
    if c and vim.lsp.buf_is_attached(bufnr, client_id_07) then
      return c
    end
  end
  return nil
end

-- `client:request` on 0.11+, `client.request` before (the dot form is deprecated there).
local function request(client, method, params, handler, bufnr)
  if has("nvim-0.11") then
    return client:request(method, params, handler, bufnr)
  end
  return client.request(method, params, handler, bufnr)
end

local function notify(client, method, params)
  if has("nvim-0.11") then
    return client:notify(method, params)
  end
  return client.notify(method, params)
end

local function request_sync(client, method, params, timeout_ms, bufnr)
  if has("nvim-0.11") then
    return client:request_sync(method, params, timeout_ms, bufnr)
  end
  return client.request_sync(method, params, timeout_ms, bufnr)
end

local function root_dir(bufnr)
  local name = api.nvim_buf_get_name(bufnr)
  local start = name ~= "" and vim.fn.fnamemodify(name, ":p:h") or uv.cwd()
  if vim.fs and vim.fs.find then
    local found = vim.fs.find(config.root_markers, { path = start, upward = true })[1]
    if found then
      return vim.fn.fnamemodify(found, ":h")
    end
  end
  return start
end

-- ---- ghost text (extmark path) ------------------------------------------------------------------
local function clear(bufnr)
  if api.nvim_buf_is_valid(bufnr) then
    api.nvim_buf_clear_namespace(bufnr, ns, 0, -1)
  end
  ghosts[bufnr] = nil
end

local function show(bufnr, row, col, text, id)
  clear(bufnr)
  local lines = vim.split(text, "\n", { plain = true })
  local opts = {
    virt_text = { { lines[1], "LocalcoderGhost" } },
    virt_text_pos = has("nvim-0.10") and "inline" or "overlay",
    hl_mode = "combine",
  }
  if #lines > 1 then
    opts.virt_lines = {}
    for i = 2, #lines do
      table.insert(opts.virt_lines, { { lines[i], "LocalcoderGhost" } })
    end
  end
  api.nvim_buf_set_extmark(bufnr, ns, row, col, opts)
  ghosts[bufnr] = { text = text, row = row, col = col, id = id }
end

--- The part of `text` that an accept of `kind` ("all" | "word" | "line") inserts.
function M.partial(text, kind)
  if kind == "line" then
    local nl = text:find("\n", 1, true)
    if nl == 1 then
      return "\n"
    end
    return nl and text:sub(1, nl - 1) or text
  elseif kind == "word" then
    return text:match("^%s*[%w_]+") or text:match("^%s*[^%w_%s]+") or text:match("^%s+") or text
  end
  return text
end

local function insert_at(bufnr, row, col, text)
  local lines = vim.split(text, "\n", { plain = true })
  skip_change[bufnr] = true
  api.nvim_buf_set_text(bufnr, row, col, row, col, lines)
  local end_row = row + #lines - 1
  local end_col = (#lines == 1 and col or 0) + #lines[#lines]
  api.nvim_win_set_cursor(0, { end_row + 1, end_col })
  return end_row, end_col
end

local function completion_id(item)
  local cmd = item and item.command
  if cmd and cmd.command == "localcoder.accepted" and cmd.arguments then
    return cmd.arguments[1]
  end
  return nil
end

local function cancel_pending(bufnr)
  local client = get_client(bufnr)
  if pending[bufnr] and client then
    if has("nvim-0.11") then
      client:cancel_request(pending[bufnr])
    else
      client.cancel_request(pending[bufnr])
    end
  end
  pending[bufnr] = nil
end

--- Ask the server for a completion at the cursor (extmark path). kind: 1 invoked, 2 automatic.
function M.request(bufnr, kind)
  bufnr = bufnr or api.nvim_get_current_buf()
  local client = get_client(bufnr)
  if not client or not enabled then
    return
  end
  cancel_pending(bufnr)
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = kind or 2 }
  local tick = api.nvim_buf_get_changedtick(bufnr)
  local cursor = api.nvim_win_get_cursor(0)
  local _, id = request(client, "textDocument/inlineCompletion", params, function(err, result)
    pending[bufnr] = nil
    if err or not result then
      return
    end
    local item = (result.items or result)[1]
    local text = item and item.insertText
    if type(text) ~= "string" or text == "" then
      return
    end
    local now = api.nvim_win_get_cursor(0)
    if api.nvim_buf_get_changedtick(bufnr) ~= tick or now[1] ~= cursor[1] or now[2] ~= cursor[2]
      or api.nvim_get_current_buf() ~= bufnr or not api.nvim_get_mode().mode:match("^i") then
      return -- stale: the user moved on
    end
    show(bufnr, cursor[1] - 1, cursor[2], text, completion_id(item))
  end, bufnr)
  pending[bufnr] = id
end

--- Tell the server where the cursor is now (`localcoder/prefetch`): it prefills a completion there at
--- the lowest priority, so the first keystroke after a jump or a buffer switch finds its cache warm.
function M.prefetch(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and api.nvim_get_current_buf() or bufnr
  local client = get_client(bufnr)
  if not client or not enabled or not config.prefetch or api.nvim_get_current_buf() ~= bufnr then
    return
  end
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  notify(client, "localcoder/prefetch", { textDocument = params.textDocument, position = params.position })
end

local function schedule_request(bufnr)
  local t = timers[bufnr]
  if t then
    t:stop()
  else
    t = uv.new_timer()
    timers[bufnr] = t
  end
  t:start(config.debounce_ms, 0, vim.schedule_wrap(function()
    if api.nvim_buf_is_valid(bufnr) and api.nvim_get_mode().mode:match("^i") then
      M.request(bufnr, 2)
    end
  end))
end

--- Dismiss the ghost text (counted as a rejection).
function M.dismiss(bufnr)
  bufnr = bufnr or api.nvim_get_current_buf()
  if native_available() then
    -- get() hides the native ghost text and hands us the item; we insert nothing
    return vim.lsp.inline_completion.get({
      bufnr = bufnr,
      on_accept = function(item)
        local client = get_client(bufnr)
        if client then
          notify(client, "localcoder/rejected", { id = completion_id(item) })
        end
      end,
    })
  end
  local g = ghosts[bufnr]
  clear(bufnr)
  local client = get_client(bufnr)
  if g and client then
    notify(client, "localcoder/rejected", { id = g.id })
  end
end

--- Accept the ghost text: kind "all" (default), "word" or "line". False when there is none.
function M.accept(kind)
  kind = kind or "all"
  local bufnr = api.nvim_get_current_buf()
  if native_available() then
    return M.accept_native(kind)
  end
  local g = ghosts[bufnr]
  if not g then
    return false
  end
  local part = M.partial(g.text, kind)
  clear(bufnr)
  local row, col = insert_at(bufnr, g.row, g.col, part)
  local rest = g.text:sub(#part + 1)
  local client = get_client(bufnr)
  if rest ~= "" then
    show(bufnr, row, col, rest, g.id) -- keep the remainder on screen
  elseif client then
    notify(client, "localcoder/accepted", { id = g.id, acceptedChars = #g.text })
  end
  return true
end

function M.accept_native(kind)
  if kind == "all" then
    return vim.lsp.inline_completion.get()
  end
  return vim.lsp.inline_completion.get({
    on_accept = function(item)
      local text = type(item.insert_text) == "string" and item.insert_text or item.insert_text.value
      local part = M.partial(text, kind)
      local bufnr = api.nvim_get_current_buf()
      local row, col
      if item.range then
        row, col = item.range.start.row, item.range.start.col
      else
        local cur = api.nvim_win_get_cursor(0)
        row, col = cur[1] - 1, cur[2]
      end
      insert_at(bufnr, row, col, part)
      skip_change[bufnr] = nil
    end,
  })
end

local function feed(keys)
  api.nvim_feedkeys(api.nvim_replace_termcodes(keys, true, false, true), "n", false)
end

-- ---- attaching ------------------------------------------------------------------------------------
local function map_keys(bufnr)
  local km = config.keymaps
  local function imap(lhs, fn, desc)
    if lhs and lhs ~= "" then
      vim.keymap.set("i", lhs, fn, { buffer = bufnr, desc = desc, silent = true })
    end
  end
  imap(km.accept, function()
    if not M.accept("all") then
      feed(km.accept)
    end
  end, "localcoder: accept completion")
  imap(km.accept_word, function()
    if not M.accept("word") then
      feed(km.accept_word)
    end
  end, "localcoder: accept a word")
  imap(km.accept_line, function()
    if not M.accept("line") then
      feed(km.accept_line)
    end
  end, "localcoder: accept a line")
  imap(km.dismiss, function()
    M.dismiss(bufnr)
  end, "localcoder: dismiss")
  imap(km.trigger, function()
    M.request(bufnr, 1)
  end, "localcoder: complete now")
end

local function watch_buffer(bufnr)
  local group = api.nvim_create_augroup("localcoder_buf_" .. bufnr, { clear = true })
  api.nvim_create_autocmd("TextChangedI", {
    group = group,
    buffer = bufnr,
    callback = function()
      if skip_change[bufnr] then
        skip_change[bufnr] = nil
        return
      end
      if ghosts[bufnr] then
        M.dismiss(bufnr) -- typing over the ghost text dismisses it
      end
      if config.auto_trigger then
        schedule_request(bufnr)
      end
    end,
  })
  api.nvim_create_autocmd("InsertEnter", {
    group = group,
    buffer = bufnr,
    callback = function()
      if config.auto_trigger then
        schedule_request(bufnr)
      end
    end,
  })
  api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
    group = group,
    buffer = bufnr,
    callback = function()
      cancel_pending(bufnr)
      if ghosts[bufnr] then
        M.dismiss(bufnr)
      end
    end,
  })
end

local function watch_cursor(bufnr)
  local group = api.nvim_create_augroup("localcoder_cursor_" .. bufnr, { clear = true })
  api.nvim_create_autocmd({ "BufEnter", "CursorHold" }, {
    group = group,
    buffer = bufnr,
    callback = function()
      M.prefetch(bufnr)
    end,
  })
end

local function on_attach(client, bufnr)
  map_keys(bufnr)
  watch_cursor(bufnr)
  if native_available() then
    vim.lsp.inline_completion.enable(enabled, { bufnr = bufnr })
  else
    watch_buffer(bufnr)
  end
end

local function client_config(bufnr)
  return {
    name = "localcoder",
    cmd = config.cmd,
    root_dir = root_dir(bufnr),
    init_options = config.init_options,
    settings = { localcoder = config.init_options },
    on_attach = on_attach,
  }
end

--- Start the server (once) and attach it to `bufnr`.
function M.attach(bufnr)
  bufnr = (bufnr == nil or bufnr == 0) and api.nvim_get_current_buf() or bufnr
  if vim.bo[bufnr].buftype ~= "" then
    return
  end
  if vim.lsp.start then
    vim.lsp.start(client_config(bufnr), { bufnr = bufnr })
    return
  end
  if not client_id_07 or not vim.lsp.get_client_by_id(client_id_07) then
    client_id_07 = vim.lsp.start_client(client_config(bufnr))
  end
  if client_id_07 then
    vim.lsp.buf_attach_client(bufnr, client_id_07)
  end
end

-- ---- commands -------------------------------------------------------------------------------------
function M.toggle()
  enabled = not enabled
  for _, bufnr in ipairs(api.nvim_list_bufs()) do
    if get_client(bufnr) then
      if native_available() then
        vim.lsp.inline_completion.enable(enabled, { bufnr = bufnr })
      elseif not enabled then
        clear(bufnr)
      end
    end
  end
  vim.notify("localcoder: completions " .. (enabled and "on" or "off"))
  return enabled
end

--- The server's counters (shown, accepted, rejected, latency...), synchronously.
function M.stats(timeout_ms)
  local bufnr = api.nvim_get_current_buf()
  local client = get_client(bufnr)
  if not client then
    return nil
  end
  local res = request_sync(client, "localcoder/stats", {}, timeout_ms or 5000, bufnr)
  return res and res.result
end

--- Infill a docstring for the Python function under the cursor (the server applies the edit).
function M.docstring()
  local bufnr = api.nvim_get_current_buf()
  local client = get_client(bufnr)
  if not client then
    return
  end
  local pos = vim.lsp.util.make_position_params(0, client.offset_encoding).position
  request(client, "workspace/executeCommand", {
    command = "localcoder.generateDocstring",
    arguments = { vim.uri_from_bufnr(bufnr), pos },
  }, function(err)
    if err then
      vim.notify("localcoder: " .. tostring(err.message or err), vim.log.levels.ERROR)
    end
  end, bufnr)
end

function M.setup(opts)
  config = vim.tbl_deep_extend("force", vim.deepcopy(M.defaults), opts or {})
  vim.cmd("highlight default link LocalcoderGhost Comment")
  local group = api.nvim_create_augroup("localcoder", { clear = true })
  api.nvim_create_autocmd("FileType", {
    group = group,
    pattern = config.filetypes or "*",
    callback = function(args)
      M.attach(args.buf)
    end,
  })
  for _, bufnr in ipairs(api.nvim_list_bufs()) do
    if api.nvim_buf_is_loaded(bufnr) and vim.bo[bufnr].filetype ~= "" then
      M.attach(bufnr)
    end
  end
end

return M
